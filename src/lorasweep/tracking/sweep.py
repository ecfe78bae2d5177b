"""Hydra callback for multiruns (Optuna or grid): one MLflow parent run per sweep, a trial record
per job, and at the end a trials table (printed, CSV) and Optuna's own plots of the study
(optimization history, parameter importance) next to Hydra's optimization_results.yaml. An
Optuna sweep's plots show its real study (every sweeper's trials); a grid's, a study made from
its trial records.

Trials log their own nested MLflow child runs (lorasweep.tracking.tracker reads PARENT_ENV). The
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorasweep.errors import one_line
from lorasweep.redaction import mask_overrides
from lorasweep.tracking.study import (
    DASHBOARD,
    TrialLink,
    finished_study,
    job_value,
    mask_url,
    quiet_optuna,
    storage_url,
)
from lorasweep.tracking.tracker import finish_parent_run, resolve_uri, start_parent_run

log = logging.getLogger(__name__)

TRIAL_RECORD = "trial.json"
TRIALS_CSV = "trials.csv"
IMPORTANCE_PNG = "param_importances.png"
HISTORY_PNG = "optimization_history.png"


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent = None  # (MlflowClient, run_id) when tracking to MLflow
        self.started: dict[str, tuple[float, int | None]] = {}  # (time, Optuna trial number)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend == "mlflow":
            self.parent = start_parent_run(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            link = TrialLink.from_env()  # set for the job only, not at its end
            self.started[config.hydra.runtime.output_dir] = (
                time.time(), link.number if link else None)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = config.hydra.runtime.output_dir
        status, objective, reason = job_value(job_return)
        overrides = mask_overrides(job_return.overrides or [], config.tracking.secret_keys)
        started, trial = self.started.pop(run_dir, (time.time(), None))
        record = {
            # the Optuna trial's number (it goes on across reruns of a study), else the job's
            "number": trial if trial is not None else config.hydra.job.num,
            "params": " ".join(overrides),
            "overrides": overrides,  # what param_importances parses
            "objective": objective,
            "status": status,
            "reason": reason,
            "duration_s": round(time.time() - started, 1),
            "run_dir": run_dir,
        }
        with open(os.path.join(run_dir, TRIAL_RECORD), "w") as fh:
            json.dump(record, fh, indent=2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        trials = collect_trials(sweep_dir)
        if not trials:  # the sweep stopped before its first trial (e.g. its storage failed)
            if self.parent is not None:
                finish_parent_run(self.parent, config, trials, [])
            return
        csv_path = write_trials_csv(sweep_dir, trials)
        print(format_trials(trials), flush=True)
        study = finished_study() or made_or_none(study_from_records, trials, config)
        plots = [made_or_none(plot_history, sweep_dir, study),
                 made_or_none(plot_importances, sweep_dir, study, config.objective.metric)
                 ] if study is not None else []
        if self.parent is not None:
            finish_parent_run(self.parent, config, trials, [csv_path, *plots])
        print(look_at_it(config), flush=True)


def look_at_it(config: DictConfig) -> str:
    """The commands that show the sweep: MLflow's UI on its runs, the dashboard on its study."""
    lines = []
    if config.tracking.backend == "mlflow":
        lines.append(f"  runs:  mlflow ui --backend-store-uri {resolve_uri(config.tracking)}")
    url = storage_url(config.hydra.sweeper.get("storage"))
    if url is not None:
        lines.append(f"  study: {DASHBOARD} {mask_url(url)}   (pip install optuna-dashboard)")
    return "\n".join(["look at it:", *lines]) if lines else ""


def collect_trials(sweep_dir: str) -> list[dict[str, Any]]:
    records = []
    for path in glob.glob(os.path.join(sweep_dir, "*", TRIAL_RECORD)):
        with open(path) as fh:
            records.append(json.load(fh))
    return sorted(records, key=lambda r: r["number"])


def write_trials_csv(sweep_dir: str, trials: list[dict[str, Any]]) -> str:
    path = os.path.join(sweep_dir, TRIALS_CSV)
    fields = ["number", "params", "objective", "status", "duration_s", "reason", "run_dir"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(trials)
    return path


def format_trials(trials: list[dict[str, Any]]) -> str:
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


def plot_history(sweep_dir: str, study) -> str | None:
    """Optuna's optimization history of the study: each trial's objective, the best so far."""
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    _pyplot()
    with quiet_optuna():
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    return save_figure(ax.figure, os.path.join(sweep_dir, HISTORY_PNG), (7, 4))


def save_figure(fig, path: str, size: tuple[float, float]) -> str:
    fig.set_size_inches(*size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _pyplot():
    # Imported here, not at the top: Hydra loads this callback for every command, and the plotting
    # stack (matplotlib, and numpy and scikit-learn beside it) is needed only at a sweep's end.
    from lorasweep.evaluation.reports import pyplot

    return pyplot()


def made_or_none(make: Callable[..., str | None], *args: Any) -> str | None:
    """Run a plot maker: a plot that cannot be made is a warning, never a failed sweep."""
    try:
        return make(*args)
    except Exception as exc:  # noqa: BLE001  (any failure: the sweep's results still stand)
        log.warning("%s: no plot: %s", make.__name__, one_line(exc))
        return None


def search_space(sweeper_params: Mapping[str, Any] | None,
                 task_overrides: Sequence[str]) -> dict[str, Any]:
    """The distributions a sweep samples, parsed by hydra-optuna-sweeper's own function: the
    sweeper's `params`, then the command line's overrides; a name given a fixed value anywhere is
    not searched. A grid's `lora.r=4,8` becomes a categorical, so grids are assessed too."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    arguments = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    distributions, fixed, _ = create_params_from_overrides(arguments)
    return {name: dist for name, dist in distributions.items() if name not in fixed}


def param_value(text: str, distribution: Any) -> Any:
    """A trial's override value back in its distribution's type (Hydra's override syntax)."""
    from hydra.core.override_parser.types import Override
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:
            if text in (str(choice), Override._get_value_element_as_str(choice)):
                return choice
        raise ValueError(f"not one of {list(distribution.choices)}")
    if isinstance(distribution, IntDistribution):
        return int(text)
    return float(text)


def study_from_records(trials: list[dict[str, Any]], config: DictConfig):
    """A grid sweep's study, in memory, from its trial records: the completed trials over the
    searched values (a record that does not fit them is left out, with an info line); None when
    the sweep searched nothing Optuna can describe (e.g. a grid over glob(...))."""
    import optuna

    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    try:
        space = search_space(params, list(config.hydra.overrides.task))
    except NotImplementedError as exc:
        log.info("no study plots: %s", one_line(exc))
        return None
    with quiet_optuna():
        study = optuna.create_study(direction="maximize")
        for record in trials:
            if record["status"] != "COMPLETE" or record.get("objective") is None:
                continue
            given = dict(o.split("=", 1) for o in record["overrides"] if "=" in o)
            try:
                values = {name: param_value(given[name], dist) for name, dist in space.items()}
                study.add_trial(optuna.trial.create_trial(
                    params=values, distributions=dict(space), value=record["objective"]))
            except (KeyError, ValueError) as exc:
                log.info("trial %s left out of the study plots: %s", record["number"], exc)
    return study


def param_importances(study, seed: int = 0) -> tuple[dict[str, float], str]:
    """Optuna's importance (fANOVA) of each searched parameter that varied over the study's
    completed trials: the importances (summing to 1, largest first) and a one-line note, how
    they were assessed or why there are none."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"{len(done)} completed trial(s), importance needs at least 2"
    names = sorted({name for t in done for name in t.params})
    varying = [n for n in names if len({repr(t.params.get(n)) for t in done}) > 1]
    if len(varying) < 2:
        what = f"only {varying[0]} varies" if varying else "no searched parameter varies"
        return {}, f"{what} across the {len(done)} completed trials"
    if len({t.value for t in done}) < 2:
        return {}, f"the objective is the same in all {len(done)} completed trials"
    with quiet_optuna():
        importances = dict(optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            params=varying))
    if not sum(importances.values()) > 0:
        return {}, f"no parameter explains the objective over {len(done)} completed trials"
    return importances, f"{len(done)} completed trials"


def plot_importances(sweep_dir: str, study, metric: str) -> str | None:
    """Optuna's parameter-importance chart; None, with an info line saying why, when there is
    nothing to assess (too few trials, nothing varied)."""
    import optuna

    importances, note = param_importances(study)
    if not importances:
        log.info("no parameter-importance plot: %s", note)
        return None
    log.info("parameter importance for %s over %s: %s", metric, note,
             ", ".join(f"{name} {value:.2f}" for name, value in importances.items()))
    _pyplot()
    with quiet_optuna():
        ax = optuna.visualization.matplotlib.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            params=list(importances))
    ax.set_title(f"Parameter importance for {metric} ({note})")
    return save_figure(ax.figure, os.path.join(sweep_dir, IMPORTANCE_PNG),
                       (7, 1.6 + 0.4 * len(importances)))
