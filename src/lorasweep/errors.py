"""User mistakes (exit code 2, one line, no traceback) versus bugs (traceback, exit code 1)."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

EXIT_USER_ERROR = 2

# transformers 5 renamed these; configs written for transformers 4 still use the old names.
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


# Parts of Hydra/OmegaConf messages that say nothing to a user of this tool.
NOISE = [
    re.compile(r"\s*Config search path:.*", re.DOTALL),
    re.compile(r"\s*(reference|object)_type=\S+"),
    re.compile(r"To append to your config use \S+"),
    re.compile(r"Error merging override \S+"),
    re.compile(r"\bbase_\w+\s*"),  # the schema entries of each group are not user options
]


def one_line(exc: BaseException) -> str:
    """Collapse an exception (and the OmegaConf cause Hydra wraps) into one readable line."""
    parts = [str(exc)]
    cause = exc.__cause__
    if cause is not None and str(cause) not in parts[0]:
        parts.append(str(cause))
    text = " ".join(parts)
    for pattern in NOISE:
        text = pattern.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r"Available options in '(\w+)': (.*)$",
                  lambda m: f"(options for {m.group(1)}: {', '.join(m.group(2).split())})", text)
    for old, new in RENAMED_KEYS.items():
        if re.search(rf"\b{old}\b", text):
            text += f" -- '{old}' was removed: use {new}"
    return text


def exit_with_user_error(exc: BaseException) -> None:
    print(f"lorasweep: error: {one_line(exc)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_cli(entry: Callable[[], object]) -> None:
    """Run a Hydra entrypoint; print user errors as one line and exit 2, let bugs raise."""
    # Make Hydra re-raise instead of printing a trimmed traceback and exiting 1.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        entry()
    except _hydra_user_errors() as exc:
        exit_with_user_error(exc)
