"""The step clock the throughput and GPU benches share.

Its own module, imported where a bench trains, so that importing a bench script (and timing
its startup) does not pull in torch and transformers.
"""

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Stamps each optimizer step's end, after the GPU has really finished it."""

    def __init__(self):
        self.stamps = []

    def _stamp(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = []
        self._stamp()

    def on_step_end(self, args, state, control, **kwargs):
        self._stamp()
