"""How every command ends: a user's mistake in one line with exit code 2, Ctrl-C and SIGTERM in one
line with the shell's code for the signal, a bug with its traceback (exit code 1).

    lorasweep: error: lora.r=-1: expected a positive integer                          (exit 2)
    lorasweep: interrupted (SIGTERM); rerun the same command to resume from ...       (exit 143)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lorasweep.errors import UserError, one_line
from lorasweep.interrupts import Terminated, failure_reason, raise_on_sigterm
from lorasweep.outputs import RESUME_HINT, disk_full

EXIT_USER_ERROR = 2
EXIT_SIGINT = 130  # 128 + the signal number, as a shell reports a process killed by it
EXIT_SIGTERM = 143
EXIT_PRUNED = 3  # a launched sweep trial stopped by its pruner (the sweeper reads pruned.json)


def _user_errors() -> tuple:
    """Our own user errors, and Hydra's and OmegaConf's errors about a config (a bad override,
    an unknown option or key, a wrong type)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, HydraException, OmegaConfBaseException)


def exit_with_user_error(exc: BaseException) -> None:
    print(f"lorasweep: error: {one_line(exc)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def exit_interrupted(exc: BaseException) -> None:
    print(f"lorasweep: {failure_reason(exc)}; rerun the same command to resume from the last "
          "complete checkpoint (when training.save_strategy writes them)", file=sys.stderr,
          flush=True)
    sys.exit(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT)


def run_cli(entry: Callable[[], object]) -> None:
    """Run a Hydra entrypoint; print user errors as one line and exit 2, let bugs raise.
    Ctrl-C and SIGTERM end in one line too (exit 130 / 143), after the run recorded them."""
    # Make Hydra re-raise instead of printing a trimmed traceback and exiting 1.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # A log file on a full disk: its lines are lost, without a traceback printed for each.
    logging.raiseExceptions = False
    raise_on_sigterm()
    try:
        entry()
    except _user_errors() as exc:
        exit_with_user_error(exc)
    except (KeyboardInterrupt, Terminated) as exc:
        exit_interrupted(exc)
    except Exception as exc:
        from lorasweep.tracking.study import is_pruned

        if disk_full(exc):  # a write that `outputs.writing` does not wrap (Hydra's own files)
            where = getattr(exc, "filename", None)
            exit_with_user_error(UserError(f"no space left on device"
                                           f"{f' writing {where}' if where else ''}: "
                                           f"free space and {RESUME_HINT}"))
        if not is_pruned(exc):  # a launched sweep trial's ranks, stopped by its pruner
            raise
        print(f"lorasweep: trial {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PRUNED)


def exit_2_on_user_error(task: Callable, *args):
    """Call `task(*args)` from a Hydra task function (train, predict, export main).

    A user error in a single run prints one line and exits 2 here, before Hydra adds its own
    "Error executing job" line. In a multirun, or with no Hydra at all (tests call `main(cfg)`),
    it propagates: the sweeper records the trial as failed and goes on to the next.
    """
    try:
        return task(*args)
    except _user_errors() as exc:
        if not _single_hydra_run():
            raise
        exit_with_user_error(exc)


def _single_hydra_run() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
