"""Trainer callbacks: speed and memory figures added to the logs every `logging_steps`, and a
signal whose exception was swallowed raised again after the step (lorasweep.interrupts).

speed/tokens_per_sec counts non-pad tokens on all ranks: the Trainer gathers them when
`include_num_input_tokens_seen="non_padding"` (set in `trainer.build_training_arguments`).
"""

from __future__ import annotations

import time

import psutil
import torch
from transformers import TrainerCallback

from lorasweep.interrupts import raise_if_signalled


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
