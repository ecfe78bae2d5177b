"""User mistakes versus bugs: the exceptions of a user's mistake, and the one line that says it.

A `UserError` (and Hydra's or OmegaConf's own errors about a config) becomes one line and exit code
2 in `lorasweep.cli.harness`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

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
