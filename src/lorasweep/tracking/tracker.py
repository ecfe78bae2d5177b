"""MLflow tracking from rank 0: one run per training, ended FINISHED or FAILED, never left RUNNING,
and a sweep's parent run, under which the trials nest their runs.

The Trainer's own MLflowCallback is not used (`report_to="none"`): it would open a second run per
rank and leave crashed runs RUNNING. `lorasweep.training.callbacks.TrackingCallback` forwards the
Trainer's logs to the run's `Tracker` instead. Light to import (no torch, no transformers): the
sweep callback, which every command loads, imports it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import urllib.request
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorasweep import distributed
from lorasweep.console import verbose
from lorasweep.errors import ConfigError, one_line
from lorasweep.redaction import masked_container

log = logging.getLogger(__name__)

PARENT_ENV = "LORASWEEP_PARENT_RUN_ID"  # a sweep's parent run id: its trials nest their runs


class Tracker:
    """No-op tracker: ranks other than 0, `tracking=none`, or an unreachable optional server."""

    run_id: str | None = None
    # Why nothing is logged although tracking was asked for; repeated in the closing summary.
    problem: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_model(self, run_dir: str, example, num_labels: int,
                  registered_model_name: str | None = None) -> None: ...
    def end(self, status: str) -> None: ...


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment_name: str, run_name: str | None):
        import mlflow

        if not verbose():  # mlflow resets its level on import: "Creating initial tables...", ...
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment_name
        existing = os.environ.get("MLFLOW_RUN_ID")  # attach to a run made elsewhere (a sweep)
        nested = os.environ.get(PARENT_ENV)  # a sweep's parent run: nest under it
        with store_lock(uri):
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_id=existing or None, run_name=run_name,
                                        nested=bool(nested) and not existing,
                                        parent_run_id=nested if nested and not existing else None)
        self.run_id = self.run.info.run_id
        log.info("MLflow run %s in experiment %r at %s", self.run_id, experiment, uri)

    def log_params(self, params):
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.mlflow.log_params(dict(items[i:i + 100]))

    def set_tags(self, tags):
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics, step=None):
        numeric = {_metric_name(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self.mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path, artifact_path=None):
        if os.path.isdir(path):
            self.mlflow.log_artifacts(path, artifact_path=artifact_path)
        elif os.path.isfile(path):
            self.mlflow.log_artifact(path, artifact_path=artifact_path)

    def log_model(self, run_dir, example, num_labels, registered_model_name=None):
        """The run as an MLflow model (lorasweep.tracking.mlflow_model)."""
        from lorasweep.tracking.mlflow_model import log_run_model

        info = log_run_model(self.mlflow, run_dir, example, num_labels, registered_model_name)
        log.info("MLflow model %s%s", info.model_uri,
                 f", registered as {registered_model_name!r} version "
                 f"{info.registered_model_version}" if registered_model_name else "")

    def end(self, status):
        try:
            self.mlflow.flush_async_logging()
        finally:
            self.mlflow.end_run(status=status)


def store_lock(uri: str):
    """A file lock beside a local sqlite store, held while it is created or migrated and the run
    is made. Two processes that open a fresh store at once both create and migrate its tables;
    one of them then fails or its run is lost. Other stores lock for themselves."""
    from contextlib import nullcontext

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    path = uri[len("sqlite:///"):]
    return FileLock(os.path.abspath(path) + ".lock", timeout=300)


def _metric_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", key)


def resolve_uri(tracking_cfg) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    if tracking_cfg.uri:
        return tracking_cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """For http(s) stores, ask the server's /health; local stores are always reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def start_tracker(tracking_cfg) -> Tracker:
    """The rank-0 tracker for this run, or a no-op one. Raises ConfigError when a required
    server is unreachable, before any training starts."""
    if tracking_cfg.backend == "none" or not distributed.is_rank_zero():
        return Tracker()
    uri = resolve_uri(tracking_cfg)
    if not server_reachable(uri):
        if tracking_cfg.required:
            raise ConfigError(f"tracking.uri={uri}: MLflow server unreachable "
                              "(tracking.required=true)")
        tracker = Tracker()
        tracker.problem = f"MLflow server {uri} unreachable at the start of the run"
        log.warning("%s: this run trains and writes its files to the run dir, but nothing is "
                    "logged to MLflow (params, metrics, artifacts)", tracker.problem)
        return tracker
    return MlflowTracker(uri, tracking_cfg.experiment_name, tracking_cfg.run_name)


def record_failed_run(cfg: DictConfig, exc: BaseException) -> None:
    """A FAILED run with the config and the reason, for a trial stopped before it could start
    (a sweep then shows every trial, each with why it failed)."""
    tracker = start_tracker(cfg.tracking)
    try:
        tracker.log_params(flatten_params(cfg))
        tracker.set_tags({"failure_reason": one_line(exc)[:5000]})
    finally:
        tracker.end("FAILED")


def flatten_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat `a.b.c -> value` params, secrets masked (lorasweep.redaction)."""
    container = masked_container(cfg, cfg.tracking.secret_keys)
    flat: dict[str, str] = {}
    _flatten(container, "", flat)
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}{key}.", out)
        return
    out[prefix[:-1]] = str(node)[:6000]


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_parent_run(config: DictConfig):
    """Create the sweep's parent run (in this process, before any trial creates the store)."""
    from mlflow.tracking import MlflowClient

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
    if sweeper.get("storage"):  # a database URL may hold a password
        from lorasweep.tracking.study import mask_url

        sweeper["storage"] = mask_url(str(sweeper["storage"]))
    params = {f"sweeper.{k}": str(v)[:6000] for k, v in sweeper.items() if k != "params"}
    params.update({f"search.{k}": str(v) for k, v in (sweeper.get("params") or {}).items()})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return client, run.info.run_id


def finish_parent_run(parent, config: DictConfig, trials: list[dict[str, Any]],
                      artifacts: list[str | None]) -> None:
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
