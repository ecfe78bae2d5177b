"""None of the library noise that says nothing to the user: what a person sees is lorasweep's own
lines (the Trainer's readable log lines are `lorasweep.training.callbacks`).

Silenced unless `log_level=debug`: transformers' LOAD REPORT for a head we know is new (we log
one line instead), DeepSpeed's "Setting accelerator to CPU" and the gcc lines of its libaio
probe, the deprecation warnings our pinned libraries raise at each other, and datasets' progress
bars while the data cache is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

EXPECTED_WARNINGS = (
    # peft/accelerate ask the model the old name; transformers 5 warns on every call
    r".*is_gradient_checkpointing.*",
    # the tokenizer is given to the Trainer as processing_class; warnings about its old name
    r".*processing_class.*",
)


def verbose() -> bool:
    return logging.getLogger("lorasweep").isEnabledFor(logging.DEBUG)


def silence_library_noise() -> None:
    """Expected warnings off (once per process), unless log_level=debug."""
    if verbose():
        return
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # DeepSpeed probes for libaio with a test compile at start; setuptools logs each gcc line
    logging.getLogger("compilers").setLevel(logging.WARNING)
    # Checkpoints saved within a second of each other (quick steps): the Trainer then orders them
    # by step, and says so as if the filesystem were at fault.
    logging.getLogger("transformers.trainer_utils").addFilter(_NoMtimeNotice())
    try:
        import torch

        if not torch.cuda.is_available():  # DeepSpeed then announces the CPU at every import
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


class _NoMtimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "mtime may not be reliable" not in str(record.msg)


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' LOAD REPORT (a table of newly initialised weights) and its loading bar off
    for one load; the caller logs what is new in one line."""
    import transformers

    logger = logging.getLogger("transformers.modeling_utils")
    drop_report, bars = _NoLoadReport(), transformers.utils.logging.is_progress_bar_enabled()
    if not verbose():
        logger.addFilter(drop_report)
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(drop_report)
        if bars:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """datasets' bars off for a block (writing the data cache: six bars that mean nothing)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    if enabled and not verbose():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
