"""Which precision a run computes in (`training.mixed_precision`), and the autocast that applies it.

`auto` (the default) is bf16 autocast where the hardware computes in bf16 natively, fp32
elsewhere. Autocast only: weights, gradients and the optimizer state stay fp32. Training, the head
warm start, evaluation and predict all use the rule, so a run's reported scores are the scores of
the model as predict computes them.

Native bf16 on a CPU is what oneDNN uses for its bf16 kernels: AVX512-BF16 or AMX tiles on x86
(torch.cpu reports both), the BF16 extension on Arm (oneDNN's own check). A CPU without it would
emulate bf16, slower than fp32, so `auto` keeps fp32 there.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16", "fp16" or "fp32"
    reason: str  # why, for the log line

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None: plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


def cpu_has_native_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU, what says so)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        features = [name for name, check in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
                                             ("amx_tile", torch.cpu._is_amx_tile_supported))
                    if check()]
        return (True, "+".join(features)) if features else (False, "no avx512_bf16 or AMX")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True, "oneDNN bf16"
    return False, "no native bf16 (oneDNN)"


def resolve(setting: str, device: str | None = None, deepspeed: bool = False) -> Precision:
    """The precision `training.mixed_precision=setting` gives on `device` ("cuda"/"cpu"; None:
    cuda when available). `no`, `bf16`, `fp16` are taken as set."""
    if setting != "auto":
        return Precision({"no": "fp32"}.get(setting, setting), "training.mixed_precision="
                         + setting)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name()} supports bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name()} has no bf16")
    native, why = cpu_has_native_bf16()
    if not native:
        return Precision("fp32", f"auto: CPU with {why}")
    if deepspeed:  # TrainingArguments takes bf16 on a CPU only with use_cpu, which drops DeepSpeed
        return Precision("fp32", f"auto: CPU with {why}, but DeepSpeed on a CPU trains in fp32")
    return Precision("bf16", f"auto: CPU with {why}")


def autocast(precision: Precision | None, device: torch.device | str):
    """The autocast context for a forward pass on `device`; a no-op for fp32 (or None)."""
    if precision is None or precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision.dtype)
