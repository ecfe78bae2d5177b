"""User mistakes (exit code 2, one line, no traceback) versus bugs (traceback, exit code 1)."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

EXIT_USER_ERROR = 2

# transformers 5 renamed these; the seeds' configs still use the old names.
RENAMED_KEYS = {
    "warmup_ratio": "training.warmup_steps (a float in [0, 1) is a ratio since transformers 5)",
    "group_by_length": "training.train_sampling_strategy=group_by_length (transformers 5)",
    "evaluation_strategy": "training.eval_strategy",
}


class UserError(Exception):
    """A problem with the user's config or data. The message names the key, file or column."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


def _hydra_user_errors() -> tuple:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, HydraException, OmegaConfBaseException)


def one_line(exc: BaseException) -> str:
    """Collapse an exception (and the OmegaConf cause Hydra wraps) into one readable line."""
    parts = [str(exc)]
    cause = exc.__cause__
    if cause is not None and str(cause) not in parts[0]:
        parts.append(str(cause))
    text = " ".join(" ".join(parts).split())
    text = text.replace("To append to your config use", "(to add a new key use")
    for old, new in RENAMED_KEYS.items():
        if re.search(rf"\b{old}\b", text):
            text += f" -- '{old}' was removed: use {new}"
    return text


def run_cli(entry: Callable[[], object]) -> None:
    """Run a Hydra entrypoint; print user errors as one line and exit 2, let bugs raise."""
    # Make Hydra re-raise instead of printing a trimmed traceback and exiting 1.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        entry()
    except _hydra_user_errors() as exc:
        print(f"lorasweep: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
