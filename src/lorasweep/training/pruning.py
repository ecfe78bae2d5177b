"""A sweep trial's side of pruning: after each evaluation, rank 0 reports the objective to the
trial's Optuna trial and asks its pruner; every rank gets the answer, so all ranks stop at the
same step. The run then ends as pruned (optuna.TrialPruned): its run dir keeps what it wrote,
its MLflow run ends KILLED with the tag `lorasweep.pruned=true`, and the sweeper records the
trial as PRUNED.

A step is the evaluation's number (1 = the first evaluation, an epoch by default), so a pruner's
`n_warmup_steps` or `min_resource` reads in evaluations whatever the batch or data size.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from lorasweep import distributed, outputs
from lorasweep.errors import one_line
from lorasweep.tracking.study import RUN_DIR_ATTR, TrialLink

log = logging.getLogger(__name__)


class PruningCallback(TrainerCallback):
    """Report `metric` after every evaluation; stop training when the pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial = trial  # optuna.trial.Trial on rank 0, None elsewhere
        self.metric = metric
        self.evaluations = 0
        self.step = 0  # the training step of the last evaluation
        self.pruned: str | None = None  # why, once pruned
        self._missing_said = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations += 1
        self.step = state.global_step
        decision = None
        if self.trial is not None:
            decision = self._report((metrics or {}).get(self.metric))
        if distributed.world_size() > 1:
            decision = distributed.broadcast_from_rank_zero(decision)
        if decision:
            self.pruned = decision
            control.should_training_stop = True
            control.should_save = False

    def _report(self, value) -> str | None:
        if value is None:
            if not self._missing_said:
                log.info("pruning: %s is not among the evaluation's metrics; this trial runs "
                         "to the end", self.metric)
                self._missing_said = True
            return None
        self.trial.report(float(value), step=self.evaluations)
        if not self.trial.should_prune():
            return None
        return (f"pruned at evaluation {self.evaluations} ({self.metric} {float(value):.4f}, "
                f"below what the pruner keeps)")


def pruning_callback(metric: str, run_dir: str) -> PruningCallback | None:
    """The callback for a sweep trial whose study can be reached (rank 0 opens the trial; the
    others only follow its decisions); None outside a sweep."""
    link = TrialLink.from_env()
    if link is None or not link.pruner:
        return None
    trial = None
    if distributed.is_rank_zero():
        try:
            trial = link.open_trial()
        except Exception as exc:  # noqa: BLE001  (the trial still trains; it just is not pruned)
            log.warning("pruning: trial %d of study %s not reachable (%s); it runs to the end",
                        link.number, link.study, one_line(exc))
        if trial is not None:
            trial.set_user_attr(RUN_DIR_ATTR, os.path.abspath(run_dir))
    if distributed.world_size() > 1:  # every rank reports or none does: their steps must agree
        reachable = distributed.broadcast_from_rank_zero(trial is not None)
    else:
        reachable = trial is not None
    return PruningCallback(trial, metric) if reachable else None


def stop_if_pruned(callback: PruningCallback | None, run_dir: str) -> None:
    """After training: raise optuna.TrialPruned when the pruner stopped it, with a record of it
    in the run dir (rank 0) for a sweeper that launched this run in another process."""
    if callback is None or callback.pruned is None:
        return
    import optuna

    if distributed.is_rank_zero():
        outputs.write_json(run_dir, outputs.PRUNED, {"reason": callback.pruned,
                                                     "evaluations": callback.evaluations,
                                                     "global_step": callback.step})
    raise optuna.TrialPruned(callback.pruned)
