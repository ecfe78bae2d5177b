"""training.mixed_precision: `auto` is bf16 autocast where the hardware has native bf16, fp32
elsewhere; weights and optimizer state stay fp32; the run records what it computed in."""

import platform
from pathlib import Path

import pytest
import torch

from helpers import tiny_trainer
from lorasweep.model.precision import autocast, cpu_has_native_bf16, resolve


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="the kernel's CPU flags are read on x86-64 Linux")
def test_native_bf16_is_what_the_cpu_flags_say():
    """torch's checks agree with the kernel's flags: avx512_bf16 or amx_tile means native bf16."""
    native, why = cpu_has_native_bf16()
    assert native == bool({"avx512_bf16", "amx_tile"} & cpuinfo_flags()), why


def test_auto_is_bf16_only_with_native_support_and_explicit_settings_are_kept():
    native, _ = cpu_has_native_bf16()
    auto = resolve("auto", "cpu")
    assert auto.name == ("bf16" if native else "fp32") and auto.reason.startswith("auto: CPU")
    assert resolve("auto", "cpu", deepspeed=True).name == "fp32"  # needs use_cpu: no DeepSpeed
    assert resolve("no", "cpu").name == "fp32" and resolve("no", "cpu").dtype is None
    assert resolve("bf16", "cpu").dtype is torch.bfloat16
    with autocast(resolve("no"), "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not cpu_has_native_bf16()[0], reason="no native bf16 on this CPU")
def test_auto_trains_under_bf16_autocast_with_fp32_weights_and_optimizer(tmp_path):
    """What the head consumes is computed in bf16 while training; every parameter, gradient
    and Adam moment stays fp32."""
    trainer = tiny_trainer(tmp_path, ["training.mixed_precision=auto"])
    assert trainer.args.bf16 and trainer.args.mixed_precision == "bf16"
    seen = []
    trainer.model.classifier.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    moments = [s["exp_avg"].dtype for s in trainer.optimizer.state.values()]
    assert moments and set(moments) == {torch.float32}


def test_mixed_precision_no_trains_in_fp32(tmp_path):
    trainer = tiny_trainer(tmp_path, ["training.mixed_precision=no"])
    assert not trainer.args.bf16 and trainer.args.mixed_precision == "no"
    seen = []
    trainer.model.classifier.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.float32}
