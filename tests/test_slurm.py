"""Sweeps and a training on a real Slurm cluster: one node on loopback (tests/slurm_cluster.py:
munged, MariaDB + slurmdbd, slurmctld, slurmd), started once for this file. A 4-trial sweep
with hydra/launcher=slurm (each trial a Slurm job, through submitit) in which a trial fails on a
bad sampled value and a job is cancelled with scancel; one training as an sbatch job whose
script starts the deepspeed launcher for 2 ranks (scripts/slurm_train.sbatch); two sweepers,
one on joblib and one on Slurm, sharing one study file. Skipped, with the reason, where the
cluster cannot start (not root, the Debian packages missing: .ci/run installs them)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import slurm_cluster
from helpers import ROOT, SMOKE, TRAIN, cli_env
from test_study import load

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

SPACE = "hparams_search=optuna_f1"
# Slurm jobs on a 2-core CI machine: no GPUs, 1 core, 2 GB each (the config's defaults are a GPU
# cluster's); a job that runs too long is ended by Slurm, not left to hang the suite
SMALL_JOBS = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
              "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster's environment (SLURM_CONF) for the test's commands; stopped after the file."""
    root = tmp_path_factory.mktemp("slurm")
    try:
        env = slurm_cluster.start(root)
    except slurm_cluster.ClusterUnavailable as exc:
        pytest.skip(f"no Slurm cluster: {exc}")
    try:
        yield {**cli_env(), "SLURM_CONF": env["SLURM_CONF"], "PATH": env["PATH"]}
    finally:
        slurm_cluster.stop(root)


def start_sweep(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def slurm(env: dict, *cmd: str) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def sacct_states(env: dict, job_ids: list[str]) -> dict[str, str]:
    out = slurm(env, "sacct", "-n", "-X", "-P", "-o", "JobID,State",
                *(f"-j{j}" for j in job_ids))
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def slurm_jobs(sweep_dir: Path) -> list[str]:
    """The ids of the Slurm jobs a sweep submitted (submitit's folder for each)."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())


def cancel_the_first_running_job(proc: subprocess.Popen, env: dict) -> str:
    """scancel the first of the sweep's jobs that Slurm starts; its id."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        running = slurm(env, "squeue", "-h", "-t", "R", "-o", "%i").split()
        if running:
            slurm(env, "scancel", running[0])
            return running[0]
        time.sleep(0.2)
    raise AssertionError("no job started")


def test_a_slurm_sweep_runs_each_trial_as_a_job_and_outlives_a_failed_and_a_cancelled_one(
        tmp_path, cluster):
    """4 trials, each a Slurm job. lora.r=-1, when sampled, fails the trial's validation in its
    job (FAIL, the sweep goes on); one job is cancelled with scancel while it runs (FAIL,
    reason naming the job and its state; the sweeper does not wait for it). The completed
    trials reached their study from their jobs (its link, in the job's environment); the
    results file and the MLflow parent run give the study's best trial."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "study.journal"
    sweep_dir = tmp_path / "s"
    proc = start_sweep(["-m", SPACE, *(o for o in SMOKE if o != "tracking=none"), *SMALL_JOBS,
                        # this seed samples lora.r = 4, -1, 4, 4: the trial that is
                        # cancelled, a bad value, two that complete (a random head: no probe
                        # to fit, seconds saved per trial; the sampled values follow from the
                        # seed and the search space: one less parameter, other values)
                        "hydra.sweeper.n_trials=4", "lora.r=choice(4,-1)",
                        "hydra.sweeper.sampler.seed=47", "model.head_init=random",
                        f"tracking.uri={db}", "tracking.experiment_name=slurm",
                        f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep_dir}"],
                       cluster)
    cancelled = cancel_the_first_running_job(proc, cluster)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-6000:]

    jobs = slurm_jobs(sweep_dir)
    assert len(jobs) == 4, jobs  # one Slurm job per trial
    states = sacct_states(cluster, jobs)
    assert states.pop(cancelled).startswith("CANCELLED"), states
    assert set(states.values()) == {"COMPLETED"}, states  # a failing trial's job still ends well

    study = load(str(storage))
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    reasons = {t.number: t.user_attrs.get("lorasweep.reason", "") for t in study.trials}
    lost = [n for n, r in reasons.items() if f"Slurm job {cancelled} ended CANCELLED" in r]
    bad = [t.number for t in study.trials if t.params["lora.r"] == -1]
    assert len(lost) == 1 and bad, reasons
    assert sorted(t.number for t in by_state[TrialState.FAIL]) == sorted(lost + bad)
    assert all("lora.r=-1: expected a positive integer" in reasons[n] for n in bad)
    complete = by_state[TrialState.COMPLETE]
    assert len(complete) == 4 - len(lost) - len(bad) == 2
    for trial in complete:  # written by the run inside its Slurm job, through the study's link
        assert trial.user_attrs["lorasweep.run_dir"] == str(sweep_dir / str(trial.number))

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_trial"] == study.best_trial.number
    assert results["best_value"] == pytest.approx(study.best_value)
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("lorasweep.sweep") == "parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    statuses = [r.info.status for r in children]  # the cancelled trial's: KILLED, or none
    assert statuses.count("FINISHED") == 2 and statuses.count("FAILED") == len(bad)
    assert "RUNNING" not in statuses, statuses
    assert "Slurm job" in out and "without a result" in out


def test_one_training_as_an_sbatch_job_starts_its_ranks_with_the_deepspeed_launcher(
        tmp_path, cluster):
    """scripts/slurm_train.sbatch, as the README gives it, with 2 ranks on CPU: one job, one
    node, the deepspeed launcher starting both ranks; a real ZeRO-2 engine, one run dir."""
    run = tmp_path / "run"
    env = {**cluster, "LORASWEEP_RANKS": "2", "LORASWEEP_RUN_DIR": str(run)}
    out = slurm(env, "sbatch", "--wait", "--parsable", "--cpus-per-task=2",
                f"--output={tmp_path}/%x-%j.out", str(ROOT / "scripts" / "slurm_train.sbatch"),
                *SMOKE, "model.head_init=random", "deepspeed=zero2",
                f"data.cache_dir={tmp_path / 'cache'}")
    job = out.strip().split(";")[0]
    assert sacct_states(cluster, [job]) == {job: "COMPLETED"}
    log = (tmp_path / f"lorasweep-{job}.out").read_text()
    assert "dist_world_size=2" in log  # the deepspeed launcher, inside the job
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["wrapped_model_class"] == "DeepSpeedEngine"
    assert meta["zero_stage_engine"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_a_local_and_a_slurm_sweeper_share_one_study(tmp_path, cluster):
    """Two sweepers started at once on one study file: one runs its trials with joblib on this
    machine, the other submits them to Slurm. Distinct trial numbers, each trial run by one of
    them, n_trials reached, one best result."""
    storage = tmp_path / "shared.journal"
    common = ["-m", SPACE, *SMOKE, "hydra/sweeper/pruner=none", "hydra.sweeper.n_trials=3",
              "model.head_init=random",
              f"hydra.sweeper.storage={storage}"]
    launchers = {"local": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
                 "slurm": SMALL_JOBS}
    procs = {name: start_sweep([*common, *extra, f"hydra.sweep.dir={tmp_path / name}"], cluster)
             for name, extra in launchers.items()}
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    assert [p.returncode for p in procs.values()] == [0, 0], outs
    study = load(str(storage))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert 3 <= len(numbers) <= 4  # or one more, if both asked for the last at once
    ran = {name: [json.loads(p.read_text())["number"]
                  for p in (tmp_path / name).glob("*/trial.json")] for name in launchers}
    assert sorted(ran["local"] + ran["slurm"]) == sorted(numbers)
    assert ran["local"] and ran["slurm"], ran
    assert len(slurm_jobs(tmp_path / "slurm")) == len(ran["slurm"])
    best = {yaml.safe_load((tmp_path / n / "optimization_results.yaml").read_text())[
        "best_trial"] for n in launchers}
    assert study.best_trial.number in best  # the sweeper that ends last sees every trial
