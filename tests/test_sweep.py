"""Sweeps in one sweeper process: Optuna trials (1 and 2 ranks each), a failing trial, MLflow
parent + child runs, a Redis-backed study resumed by rerunning, and `-m` refused in a launcher."""

import shutil
import socket
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow
SPACE = "hparams_search=optuna_f1"


def sweep(tmp_path, name, *extra, check=True):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["-m", SPACE, "model=tiny_bert", "training=smoke", f"tracking.uri={db}",
                    f"tracking.experiment_name={name}", f"hydra.sweep.dir={tmp_path / name}",
                    *extra], tmp_path, timeout=900, check=check)
    return proc, db


def runs_by_kind(db, name):
    client = MlflowClient(db)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lorasweep.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def test_optuna_sweep_three_trials_one_process(tmp_path):
    proc, db = sweep(tmp_path, "three", "hydra.sweeper.n_trials=3")
    results = yaml.safe_load((tmp_path / "three" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) >= {"training.learning_rate", "lora.r", "loss"}
    assert isinstance(results["best_value"], float)
    assert (tmp_path / "three" / "trials.csv").is_file() and "best: trial" in proc.stdout
    parents, children = runs_by_kind(db, "three")
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    rates = {c.data.params["training.learning_rate"] for c in children}
    assert len(rates) == 3  # sampled, different per trial
    assert all(1e-4 <= float(r) <= 3e-3 for r in rates)
    assert all(c.info.status == "FINISHED" for c in children)


def test_trials_on_two_ranks_each(tmp_path):
    sweep(tmp_path, "ranks", "hydra.sweeper.n_trials=2", "distributed.nproc_per_node=2",
          "deepspeed=zero2")
    for trial in ("0", "1"):
        meta = yaml.safe_load((tmp_path / "ranks" / trial / "model_metadata.json").read_text())
        assert meta["world_size"] == 2 and meta["wrapped_model_class"] == "DeepSpeedEngine"
        config = yaml.safe_load((tmp_path / "ranks" / trial / "config.yaml").read_text())
        assert 1e-4 <= config["training"]["learning_rate"] <= 3e-3
    parents, children = runs_by_kind(f"sqlite:///{tmp_path / 'mlflow.db'}", "ranks")
    assert len(parents) == 1 and len(children) == 2


def test_a_failing_trial_does_not_stop_the_sweep(tmp_path):
    # lora.r=-1 is sampled for some trials: those fail validation inside the trial
    proc, db = sweep(tmp_path, "failing", "hydra.sweeper.n_trials=4",
                     "lora.r=choice(4,-1)")
    trials = (tmp_path / "failing" / "trials.csv").read_text()
    assert trials.count(",FAIL,") >= 1 and trials.count(",COMPLETE,") >= 1, trials
    assert "lora.r=-1: expected a positive integer" in trials
    parents, children = runs_by_kind(db, "failing")
    assert len(parents) == 1
    # a trial failing validation ends its MLflow child run FAILED, with the reason
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == trials.count(",FAIL,")
    assert "lora.r=-1" in failed[0].data.tags["failure_reason"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_study_continues_when_the_sweep_is_rerun(tmp_path):
    import redis

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        args = ["hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=redis://127.0.0.1:{port}",
                "hydra.sweeper.study_name=shared", "tracking=none"]
        sweep(tmp_path, "first", *args)
        sweep(tmp_path, "second", *args)
        import optuna

        study = optuna.load_study(study_name="shared",
                                  storage=f"redis://127.0.0.1:{port}")
        assert len(study.trials) == 4
        assert redis.Redis(port=port).ping()
    finally:
        server.terminate()
        server.wait()


def test_sweep_inside_the_deepspeed_launcher_is_refused(tmp_path):
    proc = run_cli(["-m", SPACE, "model=tiny_bert"], tmp_path,
                   launcher=("deepspeed", "--num_gpus", "1"))
    assert proc.returncode != 0
    assert "cannot run inside the deepspeed/torchrun launcher" in proc.stderr + proc.stdout
