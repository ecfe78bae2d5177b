"""Trainer callbacks: speed and memory figures added to the logs every `logging_steps`; every log
forwarded to the run's tracker (MLflow, rank 0); one readable line per training log and per
evaluation, with the progress bar, instead of the raw dicts; and a signal whose exception was
swallowed raised again after the step (lorasweep.interrupts).

speed/tokens_per_sec counts non-pad tokens on all ranks: the Trainer gathers them when
`include_num_input_tokens_seen="non_padding"` (set in `trainer.build_training_arguments`).
"""

from __future__ import annotations

import time

import psutil
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorasweep.console import verbose
from lorasweep.interrupts import raise_if_signalled
from lorasweep.tracking.tracker import Tracker


class SpeedMemoryCallback(TrainerCallback):
    def __init__(self):
        self._last_time = None
        self._last_tokens = 0
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._last_time is None or "loss" not in logs:
            return  # only training logs; eval logs carry their own runtime figures
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps = state.global_step - self._last_step
        global_batch = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                        * args.world_size)
        logs["speed/tokens_per_sec"] = (state.num_input_tokens_seen - self._last_tokens) / elapsed
        logs["speed/samples_per_sec"] = steps * global_batch / elapsed
        logs.update(memory_figures())
        self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        self._last_step = state.global_step


def memory_figures() -> dict:
    figures = {"cpu/rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available():
        figures["gpu/alloc_mb"] = torch.cuda.memory_allocated() / 2**20
        figures["gpu/max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


class SignalCallback(TrainerCallback):
    """SIGTERM / Ctrl-C that arrived during a step but whose exception Python dropped (raised
    inside garbage collection) stops training at the step's end instead of being lost."""

    def on_step_end(self, args, state, control, **kwargs):
        raise_if_signalled()

    def on_evaluate(self, args, state, control, **kwargs):
        raise_if_signalled()


class TrackingCallback(TrainerCallback):
    """Forward every Trainer log (loss, lr, eval metrics, speed, memory) to the tracker."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics(logs, step=state.global_step)


def format_log(logs: dict[str, float], state) -> str:
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


def _step_line(logs: dict[str, float], state) -> str:
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
