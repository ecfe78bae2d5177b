"""Sweeps in one sweeper process: Optuna trials (1 and 2 ranks each), a failing trial, MLflow
parent + child runs, and `-m` refused in a launcher (durable studies and pruning: test_study.py);
parameter importance from trial records (no training)."""

import logging
import os
import random

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import CONF, deepspeed_launcher, run_train
from lorasweep.errors import ConfigError
from lorasweep.tracking.sweep import (
    IMPORTANCE_PNG,
    made_or_none,
    param_importances,
    plot_history,
    plot_importances,
    search_space,
    study_from_records,
)
from lorasweep.training.launcher import launcher_command, place_trial, trials_at_once

SPACE = "hparams_search=optuna_f1"


def sweep(tmp_path, name, *extra, check=True):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train(["-m", SPACE, "model=tiny_bert", "training=smoke", "baseline=none",
                      f"tracking.uri={db}", f"hydra.sweeper.storage={tmp_path / 'study.db'}",
                      f"tracking.experiment_name={name}", f"hydra.sweep.dir={tmp_path / name}",
                      *extra], timeout=900, check=check)
    return proc, db


def runs_by_kind(db, name):
    client = MlflowClient(db)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lorasweep.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


@pytest.mark.slow
def test_optuna_sweep_three_trials_one_process(tmp_path):
    # eval_loss: a smoke run's macro-F1 often ties across trials, leaving no importance to assess
    proc, db = sweep(tmp_path, "three", "hydra.sweeper.n_trials=3", "objective.metric=eval_loss")
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
    assert (tmp_path / "three" / IMPORTANCE_PNG).stat().st_size > 10_000
    artifacts = {a.path for a in MlflowClient(db).list_artifacts(parents[0].info.run_id)}
    assert {IMPORTANCE_PNG, "optimization_history.png", "trials.csv"} <= artifacts
    assert "parameter importance for eval_loss over 3 completed trials" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_parallel_trials_with_joblib_share_the_cores(tmp_path):
    """hydra/launcher=joblib: two trials at once, each in its own worker, each given half of the
    CPU threads (on GPUs each would get its own devices: see the placement test below)."""
    sweep(tmp_path, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
          "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "tracking=none")
    trials = (tmp_path / "joblib" / "trials.csv").read_text()
    assert trials.count(",COMPLETE,") == 2, trials
    expected = max(1, (os.cpu_count() or 1) // 2)
    for trial in ("0", "1"):
        meta = yaml.safe_load((tmp_path / "joblib" / trial / "model_metadata.json").read_text())
        assert meta["torch_threads"] == expected


def hydra_node(launcher_target, n_jobs, sweeper):
    from hydra.types import RunMode

    return OmegaConf.create({"mode": RunMode.MULTIRUN, "job": {"num": 0},
                             "launcher": {"_target_": launcher_target, "n_jobs": n_jobs},
                             "sweeper": sweeper})


def test_trials_at_once_get_their_own_gpus_or_share_of_threads():
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
              "n_jobs": 2}
    assert trials_at_once(hydra_node(joblib, 4, optuna)) == (2, 2)
    grid = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
            "max_batch_size": None}
    assert trials_at_once(hydra_node(joblib, 3, grid)) == (3, None)
    assert trials_at_once(hydra_node("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                                     None, grid)) == (1, 1)
    gpus = ["0", "1", "2", "3"]
    slices = [place_trial(num, 2, 2, 2, gpus, cpus=32).gpus for num in range(4)]
    assert slices == [["0", "1"], ["2", "3"], ["0", "1"], ["2", "3"]]
    assert place_trial(1, 2, 2, 1, ["4", "6"], cpus=32).gpus == ["6"]  # CUDA_VISIBLE_DEVICES ids
    assert place_trial(0, 2, 2, 1, gpus, cpus=32).own_process  # fresh process: CUDA starts there
    with pytest.raises(ConfigError, match="trial slot 1 needs GPUs 2..3 but 3 are visible"):
        place_trial(1, 2, 2, 2, gpus[:3], cpus=32)
    assert place_trial(5, 2, 2, 1, None, cpus=8).threads == 4
    assert place_trial(0, 1, 1, 2, None, cpus=8).threads is None  # alone: every core
    deepspeed = launcher_command("deepspeed", 2, [], "/run", gpus=["2", "3"])
    assert "localhost:2,3" in deepspeed and "--num_gpus" not in deepspeed
    assert "--num_gpus" in launcher_command("deepspeed", 2, [], "/run")


@pytest.mark.slow
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


@pytest.mark.slow
def test_sweep_inside_the_deepspeed_launcher_is_refused():
    proc = run_train(["-m", SPACE, "model=tiny_bert"],
                     launcher=deepspeed_launcher(1))
    assert proc.returncode != 0
    assert "cannot run inside the deepspeed/torchrun launcher" in proc.stderr + proc.stdout


def optuna_f1_params():
    return yaml.safe_load((CONF / "hparams_search" / "optuna_f1.yaml").read_text())["hydra"][
        "sweeper"]["params"]


def synthetic_trials(n, seed=0):
    """Trial records as SweepCallback writes them, over the real optuna_f1 space: the objective
    follows the learning rate, the other parameters are noise, loss never varies."""
    rng = random.Random(seed)
    trials = []
    for number in range(n):
        lr = 10 ** rng.uniform(-3.52, -2.53)
        overrides = [f"training.learning_rate={lr}", f"lora.r={rng.choice([8, 16, 32])}",
                     f"training.head_learning_rate={10 ** rng.uniform(-4, -2)}",
                     f"training.num_train_epochs={rng.choice([3, 5])}",
                     f"model.head_init={rng.choice(['probe', 'random'])}",
                     f"lora={rng.choice(['default', 'attention'])}",
                     f"lora.alpha={rng.choice([16, 32])}",
                     f"lora.dropout={rng.uniform(0, 0.2)}", "loss=ce",
                     f"loss.alpha={rng.uniform(0.2, 1)}",
                     f"training.warmup_steps={rng.uniform(0, 0.1)}", "model=tiny_bert"]
        trials.append({"number": number, "params": " ".join(overrides), "overrides": overrides,
                       "objective": 0.2 + 200 * lr + rng.uniform(0, 0.01), "status": "COMPLETE"})
    return trials


def sweep_config(params, task):
    return OmegaConf.create({"hydra": {"sweeper": {"params": params}, "overrides": {"task": task}},
                             "objective": {"metric": "eval_f1_macro"}})


def broken_plot(*args):
    raise RuntimeError("no display\nat all")


def test_param_importance_on_a_study_made_from_trial_records(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lorasweep.tracking.sweep")
    config = sweep_config(optuna_f1_params(), ["hparams_search=optuna_f1", "model=tiny_bert"])
    space = search_space(optuna_f1_params(), ["hparams_search=optuna_f1", "model=tiny_bert"])
    assert len(space) == 11
    trials = synthetic_trials(12)
    study = study_from_records(trials, config)
    assert len(study.trials) == 12
    assert isinstance(study.trials[0].params["lora.r"], int)  # back in its distribution's type
    importances, note = param_importances(study)
    assert note == "12 completed trials"
    assert set(importances) == set(space) - {"loss"}  # loss=ce in every trial: not assessed
    assert sum(importances.values()) == pytest.approx(1.0)
    assert max(importances, key=importances.get) == "training.learning_rate"
    assert importances["training.learning_rate"] > 0.5

    # nothing to assess: too few completed trials, nothing varies, one parameter of a grid
    failed = dict(trials[1], status="FAIL", objective=None)
    assert param_importances(study_from_records([trials[0], failed], config)) == (
        {}, "1 completed trial(s), importance needs at least 2")
    same = [dict(t, overrides=trials[0]["overrides"]) for t in trials[:4]]
    assert param_importances(study_from_records(same, config))[1] == (
        "no searched parameter varies across the 4 completed trials")
    grid = study_from_records(trials[:3], sweep_config(None, ["lora.r=8,16,4"]))
    assert plot_importances(str(tmp_path), grid, "eval_f1_macro") is None
    assert not (tmp_path / IMPORTANCE_PNG).exists()
    assert "no parameter-importance plot: only lora.r varies across the 3 completed trials" \
        in caplog.text

    path = plot_importances(str(tmp_path), study, "eval_f1_macro")
    assert path == str(tmp_path / IMPORTANCE_PNG) and (tmp_path / IMPORTANCE_PNG).is_file()
    assert plot_history(str(tmp_path), study) == str(tmp_path / "optimization_history.png")
    assert made_or_none(broken_plot, str(tmp_path)) is None  # a plot never fails the sweep
    assert "broken_plot: no plot: no display at all" in caplog.text


def test_the_slurm_launcher_config_composes():
    """conf/hydra/launcher/slurm.yaml: one Slurm job per trial with nproc_per_node GPUs, through
    lorasweep's launcher on the hydra-submitit-launcher plugin (composed only: test_slurm.py
    submits to a real cluster)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=[SPACE, "hydra/launcher=slurm", "distributed.nproc_per_node=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "lorasweep.cli.slurm.SlurmLauncher"
    assert launcher.gpus_per_node == 2 and launcher.tasks_per_node == 1
