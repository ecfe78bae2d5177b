"""Hydra callback for multiruns (Optuna or grid): one MLflow parent run per sweep, a trial record
per job, and at the end a trials table (printed, CSV) and plots (optimization history, parameter
importance) next to Hydra's optimization_results.yaml.

Trials log their own nested MLflow child runs (lorasweep.tracking.tracker reads PARENT_ENV). The
per-trial record is a file in the trial's dir, so it also works when trials run in other
processes (hydra/launcher=joblib).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorasweep.errors import one_line
from lorasweep.redaction import mask_overrides
from lorasweep.tracking.study import DASHBOARD, TrialLink, job_value, mask_url, storage_url
from lorasweep.tracking.tracker import finish_parent_run, resolve_uri, start_parent_run

log = logging.getLogger(__name__)

TRIAL_RECORD = "trial.json"
TRIALS_CSV = "trials.csv"
IMPORTANCE_PNG = "param_importances.png"


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
        csv_path = write_trials_csv(sweep_dir, trials)
        print(format_trials(trials), flush=True)
        plots = [made_or_none(plot_history, sweep_dir, trials),
                 made_or_none(plot_importances, sweep_dir, trials, config)]
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


def plot_history(sweep_dir: str, trials: list[dict[str, Any]]) -> str | None:
    """Objective per trial and the best so far (failed trials marked on the axis)."""
    if not trials:
        return None
    plt = _pyplot()
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
    """A trial's override value back in its distribution's type (the Optuna sweeper wrote
    `str(value)`, Hydra's basic sweeper its override syntax)."""
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


def trial_params(overrides: Sequence[str], space: Mapping[str, Any]) -> dict[str, Any]:
    """The value of each searched parameter in a trial's overrides; ValueError naming the
    parameter when one is missing or does not fit its distribution."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    params = {}
    for name, distribution in space.items():
        if name not in given:
            raise ValueError(f"{name}: not among the trial's overrides")
        try:
            params[name] = param_value(given[name], distribution)
        except ValueError as exc:
            raise ValueError(f"{name}={given[name]}: {exc}") from None
    return params


def completed_trials(trials: list[dict[str, Any]], space: Mapping[str, Any]) -> list[Any]:
    """The completed trial records as optuna FrozenTrials over `space`; a record whose values do
    not fit the space (e.g. a study resumed with another space) is left out, with an info line."""
    import optuna

    frozen = []
    for record in trials:
        objective = record.get("objective")
        if record["status"] != "COMPLETE" or objective is None or not math.isfinite(objective):
            continue
        try:
            params = trial_params(record.get("overrides") or record["params"].split(), space)
            frozen.append(optuna.trial.create_trial(params=params, distributions=dict(space),
                                                    value=objective))
        except ValueError as exc:  # create_trial: a value outside its distribution
            log.info("trial %s left out of the parameter importance: %s", record["number"], exc)
    return frozen


def param_importances(trials: list[dict[str, Any]], space: Mapping[str, Any],
                      seed: int = 0) -> tuple[dict[str, float], str]:
    """Importance of each searched parameter that varied, over the completed trials, from an
    in-memory study rebuilt from the trial records (the sweeper's own study is out of reach when
    its storage is in memory). Returns the importances (summing to 1, largest first) and a
    one-line note: how they were assessed, or why there are none.

    The evaluator is a random forest's mean decrease in impurity: optuna 2.10's default, fANOVA,
    fails under numpy 2 (it assigns scikit-learn's (1, 1)-shaped node value into a float row)."""
    import optuna

    with warnings.catch_warnings():  # create_trial / add_trials are "experimental" in optuna 2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        done = completed_trials(trials, space)
        if len(done) < 2:
            return {}, f"{len(done)} completed trial(s), importance needs at least 2"
        varying = [name for name in space if len({repr(t.params[name]) for t in done}) > 1]
        if len(varying) < 2:
            what = f"only {varying[0]} varies" if varying else "no searched parameter varies"
            return {}, f"{what} across the {len(done)} completed trials"
        if len({t.value for t in done}) < 2:
            return {}, f"the objective is the same in all {len(done)} completed trials"
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
        try:
            study = optuna.create_study()
            study.add_trials(done)
            evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
            importances = dict(optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=varying))
        finally:
            optuna.logging.set_verbosity(verbosity)
    if not sum(importances.values()) > 0:  # no tree found a split (e.g. 2 trials, bootstrap)
        return {}, f"the random forest found no split in {len(done)} completed trials"
    return importances, f"{len(done)} completed trials"


def plot_importances(sweep_dir: str, trials: list[dict[str, Any]],
                     config: DictConfig) -> str | None:
    """Bar chart of parameter importance; None, with an info line saying why, when there is
    nothing to assess (too few trials, nothing varied)."""
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    try:
        space = search_space(params, list(config.hydra.overrides.task))
    except NotImplementedError as exc:  # e.g. a grid over glob(...): not a distribution
        log.info("no parameter-importance plot: %s", one_line(exc))
        return None
    importances, note = param_importances(trials, space)
    if not importances:
        log.info("no parameter-importance plot: %s", note)
        return None
    log.info("parameter importance for %s over %s: %s", config.objective.metric, note,
             ", ".join(f"{name} {value:.2f}" for name, value in importances.items()))
    constant = [name for name in space if name not in importances]
    return draw_importances(os.path.join(sweep_dir, IMPORTANCE_PNG), importances,
                            f"Parameter importance for {config.objective.metric} ({note})",
                            f"not shown, one value in every completed trial: {', '.join(constant)}"
                            if constant else "")


def draw_importances(path: str, importances: Mapping[str, float], title: str,
                     footnote: str = "") -> str:
    plt = _pyplot()
    names = list(importances)[::-1]  # barh draws bottom-up: the most important on top
    values = [importances[name] for name in names]
    height = 1.6 + 0.4 * len(names)
    fig, ax = plt.subplots(figsize=(7, height))
    bars = ax.barh(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("importance: random forest, mean decrease in impurity (sums to 1)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if footnote:
        fig.text(0.01, 0.02, footnote, fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.25 / height if footnote else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
