"""Hydra callback for multiruns (Optuna or grid): one MLflow parent run per sweep, a trial record
per job, and at the end a trials table (printed, CSV) and plots next to Hydra's
optimization_results.yaml.

Trials log their own nested MLflow child runs (tracking.py reads LORASWEEP_PARENT_RUN_ID). The
per-trial record is a file in the trial's dir, so it also works when trials run in other
processes (hydra/launcher=joblib).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorasweep.errors import one_line

log = logging.getLogger(__name__)

TRIAL_RECORD = "trial.json"
TRIALS_CSV = "trials.csv"
PARENT_ENV = "LORASWEEP_PARENT_RUN_ID"


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent = None  # (MlflowClient, run_id) when tracking to MLflow
        self.started: Dict[str, float] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "mlflow":
            self.parent = start_parent_run(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.started[config.hydra.runtime.output_dir] = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = config.hydra.runtime.output_dir
        ok = job_return.status == JobStatus.COMPLETED
        record = {
            "number": config.hydra.job.num,
            "params": " ".join(job_return.overrides or []),
            "objective": float(job_return._return_value) if ok else None,
            "status": "COMPLETE" if ok else "FAIL",
            "reason": "" if ok else one_line(job_return._return_value),
            "duration_s": round(time.time() - self.started.pop(run_dir, time.time()), 1),
            "run_dir": run_dir,
        }
        with open(os.path.join(run_dir, TRIAL_RECORD), "w") as fh:
            json.dump(record, fh, indent=2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        trials = collect_trials(sweep_dir)
        csv_path = write_trials_csv(sweep_dir, trials)
        print(format_trials(trials), flush=True)
        plot = plot_history(sweep_dir, trials)
        if self.parent is not None:
            finish_parent_run(self.parent, config, trials, [csv_path, plot])


def start_parent_run(config: DictConfig):
    """Create the sweep's parent run (in this process, before any trial creates the store)."""
    from mlflow.tracking import MlflowClient

    from lorasweep.tracking import resolve_uri, server_reachable

    uri = resolve_uri(config.tracking)
    if not server_reachable(uri):
        log.warning("MLflow server %s unreachable: the sweep is not logged", uri)
        return None
    client = MlflowClient(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=f"sweep {os.path.basename(config.hydra.sweep.dir)}",
                            tags={"lorasweep.sweep": "parent",
                                  "sweep_dir": os.path.abspath(config.hydra.sweep.dir)})
    os.environ[PARENT_ENV] = run.info.run_id  # trials nest their runs under it
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    params = {f"sweeper.{k}": str(v)[:6000] for k, v in sweeper.items() if k != "params"}
    params.update({f"search.{k}": str(v) for k, v in (sweeper.get("params") or {}).items()})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return client, run.info.run_id


def collect_trials(sweep_dir: str) -> List[Dict[str, Any]]:
    records = []
    for path in glob.glob(os.path.join(sweep_dir, "*", TRIAL_RECORD)):
        with open(path) as fh:
            records.append(json.load(fh))
    return sorted(records, key=lambda r: r["number"])


def write_trials_csv(sweep_dir: str, trials: List[Dict[str, Any]]) -> str:
    path = os.path.join(sweep_dir, TRIALS_CSV)
    fields = ["number", "params", "objective", "status", "duration_s", "reason", "run_dir"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(trials)
    return path


def format_trials(trials: List[Dict[str, Any]]) -> str:
    lines = ["", f"{'#':>3}  {'status':<8} {'objective':>9} {'time s':>7}  params"]
    for t in trials:
        objective = "" if t["objective"] is None else f"{t['objective']:.4f}"
        lines.append(f"{t['number']:>3}  {t['status']:<8} {objective:>9} {t['duration_s']:>7.1f}"
                     f"  {t['params']}")
    done = [t for t in trials if t["objective"] is not None]
    if done:
        best = max(done, key=lambda t: t["objective"])
        lines.append(f"best: trial {best['number']} objective {best['objective']:.4f}: "
                     f"{best['params']}")
    return "\n".join(lines)


def plot_history(sweep_dir: str, trials: List[Dict[str, Any]]) -> Optional[str]:
    """Objective per trial and the best so far (failed trials marked on the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in trials if t["objective"] is not None]
    best, best_line = float("-inf"), []
    for t in done:
        best = max(best, t["objective"])
        best_line.append(best)
    ax.plot([t["number"] for t in done], [t["objective"] for t in done], "o", label="trial")
    ax.step([t["number"] for t in done], best_line, where="post", label="best so far")
    failed = [t["number"] for t in trials if t["objective"] is None]
    if failed:
        ax.plot(failed, [ax.get_ylim()[0]] * len(failed), "x", color="red", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title("Optimization history")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(sweep_dir, "optimization_history.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_parent_run(parent, config: DictConfig, trials: List[Dict[str, Any]],
                      artifacts: List[Optional[str]]) -> None:
    client, run_id = parent
    done = [t for t in trials if t["objective"] is not None]
    try:
        if done:
            best = max(done, key=lambda t: t["objective"])
            client.log_metric(run_id, "best_value", best["objective"])
            client.set_tag(run_id, "best_params", best["params"])
            client.set_tag(run_id, "best_trial", str(best["number"]))
        client.log_metric(run_id, "n_trials", len(trials))
        client.log_metric(run_id, "n_failed", len(trials) - len(done))
        results = os.path.join(config.hydra.sweep.dir, "optimization_results.yaml")
        for path in [*artifacts, results]:
            if path and os.path.isfile(path):
                client.log_artifact(run_id, path)
    finally:
        client.set_terminated(run_id, status="FINISHED" if done else "FAILED")
