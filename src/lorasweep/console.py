"""What a person sees while a run trains: the progress bar, one readable line per logging step
and per evaluation, and none of the library noise that says nothing to the user.

Silenced unless `log_level=debug`: transformers' LOAD REPORT for a head we know is new (we log
one line instead), DeepSpeed's "Setting accelerator to CPU" and the gcc lines of its libaio
probe, the deprecation warnings our pinned libraries raise at each other, datasets' progress bars
while the data cache is written, and the Trainer's raw log dicts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Dict, Iterator

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

log = logging.getLogger(__name__)

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
    try:
        import torch

        if not torch.cuda.is_available():  # DeepSpeed then announces the CPU at every import
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


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


def format_log(logs: Dict[str, float], state) -> str:
    """One line for a Trainer log: a training step, an evaluation, or the end of training."""
    if "loss" in logs:  # a training step (its logs carry train_runtime too)
        return _step_line(logs, state)
    if "eval_f1_macro" in logs or "eval_loss" in logs:
        shown = ", ".join(f"{k[5:]} {logs[k]:.4f}" for k in
                          ("eval_f1_macro", "eval_accuracy", "eval_loss") if k in logs)
        return f"epoch {logs.get('epoch', state.epoch):.2f} evaluation: {shown}"
    if "train_runtime" in logs:
        return (f"trained {state.global_step} steps in {logs['train_runtime']:.0f} s "
                f"({logs.get('train_samples_per_second', 0):.1f} samples/s)")
    return _step_line(logs, state)


def _step_line(logs: Dict[str, float], state) -> str:
    parts = [f"step {state.global_step}/{state.max_steps}",
             f"epoch {logs.get('epoch', state.epoch):.2f}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("learning_rate", "lr", ".2e"),
                            ("speed/samples_per_sec", "samples/s", ".1f")):
        if key in logs:
            parts.append(f"{label} {logs[key]:{fmt}}")
    return ", ".join(parts)


class LineProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with one readable line per log instead of a raw dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state))


class LinePrinterCallback(TrainerCallback):
    """With the bar off (`training.disable_tqdm=true`): the same lines, printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_log(logs, state), flush=True)


def use_readable_logs(trainer) -> None:
    """Swap the Trainer's dict-printing callbacks for the line-printing ones."""
    if verbose():
        return
    for old, new in ((ProgressCallback, LineProgressCallback),
                     (PrinterCallback, LinePrinterCallback)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new)
