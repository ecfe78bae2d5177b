"""Durable Optuna studies (lorasweep.tracking.study, hydra/sweeper=lorasweep_optuna): a sweep
killed mid-trial and run again, two sweepers on one study (a sqlite file, a journal file, a real
PostgreSQL server), pruning (one rank and two), the types of sampled values. Real sweeper
processes, real storages; tiny models."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import ROOT, SMOKE, TRAIN, cli_env, run_train
from lorasweep.distributed import free_port
from lorasweep.tracking.study import (
    INTERRUPTED_ATTR,
    TrialLink,
    mask_url,
    storage_url,
    study_name,
)

SPACE = "hparams_search=optuna_f1"
# every evaluation a step: 3 evaluations in a smoke run's 6 steps, so a pruner can stop one early
EVALUATED = ["training.eval_strategy=steps", "training.eval_steps=2"]


def sweep_args(tmp_path: Path, name: str, storage, *extra: str) -> list[str]:
    return ["-m", SPACE, *SMOKE, f"hydra.sweeper.storage={storage}",
            f"hydra.sweep.dir={tmp_path / name}", *extra]


def start_sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def load(storage: str) -> optuna.Study:
    url = storage_url(storage)
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        url = optuna.storages.JournalStorage(JournalFileBackend(url))
    names = optuna.study.get_all_study_names(url)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=url)


def wait_for_training(job_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the job in `job_dir` is training (its log has the LoRA line, logged just before
    the Trainer starts)."""
    log = job_dir / "train.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if log.exists() and "LoRA:" in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{job_dir} never started training")


def test_a_storage_path_becomes_a_url_and_a_derived_name_follows_the_command(tmp_path):
    assert storage_url(None) is None
    assert storage_url(str(tmp_path / "s.db")) == f"sqlite:///{tmp_path / 's.db'}"
    assert storage_url("postgresql://u:pw@h/db") == "postgresql://u:pw@h/db"
    assert storage_url(str(tmp_path / "s.journal")) == str(tmp_path / "s.journal")
    assert mask_url("postgresql://u:pw@h:5432/db") == "postgresql://u:****@h:5432/db"
    assert mask_url("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"
    one = study_name(None, ["hparams_search=optuna_f1", "data=files"])
    assert one == study_name(None, ["data=files", "hparams_search=optuna_f1"])  # order-free
    assert one != study_name(None, ["hparams_search=optuna_f1", "data=sample_ledger"])
    assert study_name("mine", ["data=files"]) == "mine"
    link = TrialLink("sqlite:////tmp/s.db", one, {"_target_": "optuna.pruners.NopPruner"}, 3)
    assert TrialLink.decode(link.encode()) == link


@pytest.mark.slow
def test_a_killed_sweeper_leaves_no_trial_running_and_the_same_command_finishes_the_study(
        tmp_path):
    """SIGTERM mid-trial: exit 143, that trial FAIL at once. SIGKILL mid-trial: the trial stays
    RUNNING until the same command runs again, which fails it and runs the study to n_trials."""
    storage = str(tmp_path / "study.journal")  # the default kind of file
    # 300 steps: long enough to be stopped mid-trial; trials run as sampled, nothing pruned.
    # Each invocation its own sweep dir, as the default (a timestamp) gives: the same study.
    args = sweep_args(tmp_path, "s", storage, "hydra.sweeper.n_trials=3",
                      "training.max_steps=300", "hydra/sweeper/pruner=none")

    first = start_sweep([*args, f"hydra.sweep.dir={tmp_path / 'first'}"])
    wait_for_training(tmp_path / "first" / "0", first)
    os.killpg(first.pid, signal.SIGTERM)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 143, out
    assert "interrupted (SIGTERM)" in out
    assert "the sweep stopped during trial(s) 0 (marked FAIL, not counted)" in out
    trials = load(storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs[INTERRUPTED_ATTR] is True

    second = start_sweep([*args, f"hydra.sweep.dir={tmp_path / 'second'}"])
    wait_for_training(tmp_path / "second" / "1", second)  # trial 1 done, trial 2 training
    os.killpg(second.pid, signal.SIGKILL)
    second.communicate(timeout=60)
    assert load(storage).trials[2].state == TrialState.RUNNING  # nobody could tell it

    proc = run_train([*args, f"hydra.sweep.dir={tmp_path / 'third'}"], timeout=600, check=True)
    states = [t.state for t in load(storage).trials]
    assert TrialState.RUNNING not in states
    # trials 0 and 2 failed because their sweeper stopped: they do not count toward n_trials=3
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL,
                      TrialState.COMPLETE, TrialState.COMPLETE], states
    assert "1 of 3 trials counted so far" in proc.stdout
    assert "5 trials, 3 complete, 0 pruned, 2 fail" in proc.stdout


def postgres_url():
    """A PostgreSQL server of this test's own on a free loopback port (initdb, pg_ctl); its URL,
    then it is stopped and its files removed. Skipped where Debian's `postgresql` is missing."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    initdb = os.path.join(bindir[-1], "initdb") if bindir else shutil.which("initdb")
    if not initdb or not os.path.exists(initdb):
        pytest.skip("no PostgreSQL server here (apt-get install postgresql; .ci/run does)")
    run_as = []
    data = tempfile.mkdtemp(prefix="lorasweep-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root: as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(data, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    bin_ = os.path.dirname(initdb)
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", data, "-U", "lorasweep", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*run_as, os.path.join(bin_, "pg_ctl"), "-D", data, "-l", f"{data}/log", "-w",
                    "-o", f"-p {port} -k {data} -h 127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run([*run_as, os.path.join(bin_, "createdb"), "-h", "127.0.0.1", "-p",
                        str(port), "-U", "lorasweep", "optuna"], check=True, capture_output=True)
        yield f"postgresql://lorasweep@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, os.path.join(bin_, "pg_ctl"), "-D", data, "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def shared_storage(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "shared.db")
    elif request.param == "journal":
        yield str(tmp_path / "shared.journal")
    else:
        yield from postgres_url()


@pytest.mark.slow
def test_two_sweepers_share_one_study(tmp_path, shared_storage):
    """Two sweeper processes started at once on one study: distinct trial numbers, every trial
    accounted for in one of the two sweeps, n_trials reached, one best result."""
    procs = [start_sweep(sweep_args(tmp_path, name, shared_storage, "hydra.sweeper.n_trials=4",
                                    "hydra/sweeper/pruner=none"))
             for name in ("a", "b")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    url = storage_url(shared_storage)
    if "://" in url:
        names = optuna.study.get_all_study_names(url)
        assert len(names) == 1
        study = optuna.load_study(study_name=names[0], storage=url)
    else:
        study = load(shared_storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # both count the study's trials: 4, or one more if both asked for the last at once
    assert 4 <= len(complete) == len(study.trials) <= 5
    ran = []
    for name in ("a", "b"):
        ran += [json.loads(p.read_text())["number"] for p in (tmp_path / name).glob("*/trial.json")]
    assert sorted(ran) == sorted(numbers)  # what both ran: no trial lost, none twice
    best = [yaml.safe_load((tmp_path / n / "optimization_results.yaml").read_text())
            for n in ("a", "b")]
    # the sweeper that ends last sees every trial; its best is the study's
    assert study.best_trial.number in {b["best_trial"] for b in best}


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_says_so(tmp_path):
    """Median pruner after one trial: the trials with a random head (far below the probe head's
    first evaluation) stop at their first evaluation, PRUNED in the study, KILLED with the tag
    lorasweep.pruned in MLflow, their run dirs kept; sampled ints stay ints."""
    storage = str(tmp_path / "study.db")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train(sweep_args(tmp_path, "p", storage, "hydra.sweeper.n_trials=3", *EVALUATED,
                                "hydra.sweeper.pruner.n_startup_trials=1",
                                "tracking=mlflow", f"tracking.uri={db}",
                                "tracking.experiment_name=p"), timeout=600, check=True)
    study = load(storage)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state, t.params["model.head_init"]) for t in study.trials]
    assert all(t.params["model.head_init"] == "random" for t in pruned)
    assert "PRUNED" in (tmp_path / "p" / "trials.csv").read_text()
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) == len(pruned)
    assert all(r.data.tags["lorasweep.pruned"] == "true" for r in killed)
    for trial in pruned:
        run_dir = Path(trial.user_attrs["lorasweep.run_dir"])
        record = json.loads((run_dir / "pruned.json").read_text())
        assert record["evaluations"] == 1 and record["global_step"] == 2  # of 6 steps
        assert (run_dir / ".hydra" / "config.yaml").is_file()  # what it wrote stays
    assert "pruned" in proc.stdout
    # types: ints and categoricals as sampled, in the results and in each trial's config
    results = yaml.safe_load((tmp_path / "p" / "optimization_results.yaml").read_text())
    assert isinstance(results["best_params"]["lora.r"], int)
    assert isinstance(results["best_params"]["training.num_train_epochs"], int)
    assert results["best_params"]["model.head_init"] in ("probe", "random")
    config = yaml.safe_load((tmp_path / "p" / "0" / ".hydra" / "config.yaml").read_text())
    assert isinstance(config["lora"]["r"], int) and isinstance(config["lora"]["dropout"], float)


@pytest.mark.slow
def test_trials_on_two_ranks_each_and_pruning_stops_both_ranks(tmp_path):
    """Each trial launches 2 ranks (a real ZeRO-2 engine) from the one sweeper process. In the
    pruned trial rank 0 reports and decides, both ranks stop at the same step (or the run would
    hang at its next collective), and the sweeper reads the launched run's pruned.json."""
    storage = str(tmp_path / "study.db")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_train(sweep_args(tmp_path, "r", storage, "hydra.sweeper.n_trials=2", *EVALUATED,
                         "hydra.sweeper.pruner.n_startup_trials=1",
                         "distributed.nproc_per_node=2", "deepspeed=zero2",
                         "tracking=mlflow", f"tracking.uri={db}", "tracking.experiment_name=r"),
              timeout=600, check=True)
    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED], [
        (t.state, t.params["model.head_init"]) for t in study.trials]
    meta = yaml.safe_load((tmp_path / "r" / "0" / "model_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["wrapped_model_class"] == "DeepSpeedEngine"
    config = yaml.safe_load((tmp_path / "r" / "0" / "config.yaml").read_text())
    assert 1e-4 <= config["training"]["learning_rate"] <= 3e-3
    run_dir = Path(study.trials[1].user_attrs["lorasweep.run_dir"])
    assert run_dir == tmp_path / "r" / "1"
    assert json.loads((run_dir / "pruned.json").read_text())["global_step"] == 2
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    parents = [r for r in runs if r.data.tags.get("lorasweep.sweep") == "parent"]
    children = {r.data.tags["run_dir"]: r for r in runs
                if r.data.tags.get("lorasweep.sweep") != "parent"}
    assert len(parents) == 1 and len(children) == 2  # one MLflow run per trial: rank 0's
    assert children[str(run_dir)].info.status == "KILLED"
    assert children[str(tmp_path / "r" / "0")].info.status == "FINISHED"


def test_the_dashboard_serves_a_study_file(tmp_path):
    """`optuna-dashboard <storage>` (the command a sweep prints at its end) on the default kind
    of study file: the real server on a loopback port lists the study and its trials."""
    import urllib.request

    from lorasweep.tracking.study import open_storage, quiet_optuna

    path = tmp_path / "optuna.journal"
    with quiet_optuna():
        study = optuna.create_study(storage=open_storage(str(path)), study_name="lorasweep-x",
                                    direction="maximize")
        for value in (0.2, 0.5):
            trial = study.ask()
            trial.report(value, 1)
            study.tell(trial, value)
    dashboard = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed (pip install optuna-dashboard)")
    port = free_port()
    server = subprocess.Popen([dashboard, str(path), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while body is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the dashboard never answered"
        summary = body["study_summaries"][0]
        assert summary["study_name"] == "lorasweep-x"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/"
                                    f"{summary['study_id']}", timeout=10) as response:
            detail = json.loads(response.read())
        assert [t["values"] for t in detail["trials"]] == [[0.2], [0.5]]
    finally:
        server.terminate()
        server.wait(timeout=30)
