"""What DeepSpeed needs before it starts: the `deepspeed` config group as the plain dict
`TrainingArguments(deepspeed=...)` takes, DeepSpeed's own "will it fit" memory estimate, and no
stale build lock of one of its ops.

DeepSpeed compiles some ops on first use (on CPU, its shared-memory communication op) under a lock
file in torch's extensions dir. A build that is killed (Ctrl-C during a first run) leaves the lock,
and every later run would wait on it forever: `clear_stale_build_locks` removes such a lock, with a
warning line. It is not the user's doing, so it is no error.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import time
from typing import Any

from omegaconf import OmegaConf

from lorasweep.errors import ConfigError

log = logging.getLogger(__name__)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins key by key, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_deepspeed_config(ds_cfg) -> dict[str, Any] | None:
    """None for `deepspeed=none`; else the group's `config`, with `config_path`'s JSON merged
    over it (the JSON wins on conflicts: it is the file a user tuned). "auto" values stay for
    the Trainer to fill from training.*."""
    if not ds_cfg.enabled:
        return None
    config = OmegaConf.to_container(ds_cfg.config, resolve=True)
    if ds_cfg.config_path:
        try:
            with open(ds_cfg.config_path) as fh:
                external = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config_path={ds_cfg.config_path}: "
                              "file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config_path={ds_cfg.config_path}: invalid JSON "
                              f"({exc})") from None
        config = deep_merge(config, external)
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config.zero_optimization.stage={stage}: expected 0-3")
    return config


def zero_stage(ds_config: dict[str, Any] | None) -> int:
    return 0 if not ds_config else int(ds_config.get("zero_optimization", {}).get("stage", 0))


def count_model_parameters(base_path: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) of the base model, from its config on the
    meta device: nothing is loaded. Call before TrainingArguments turns ZeRO-3 init on. The
    classifier head (hidden x labels) is left out; it is tiny next to the body."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def estimate_model_state_memory(ds_config: dict[str, Any], total_params: int,
                                largest_layer_params: int, world_size: int) -> str:
    """DeepSpeed's own estimate of per-GPU / per-node CPU memory for model states (weights,
    gradients, Adam states) at this ZeRO stage and world size, as one line.

    The estimators assume every weight trains (mixed precision); with LoRA only the adapters
    carry gradients and optimizer states, so this is the upper bound on what the model needs.
    """
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_param = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, num_gpus_per_node=world_size,
            cpu_offload=offload_opt, cpu_offload_params=offload_param)
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params,
                                                         num_gpus_per_node=world_size,
                                                         cpu_offload=offload_opt)
    return (f"ZeRO-{stage} memory estimate for model states, {total_params / 1e6:.1f}M params on "
            f"{world_size} rank(s): {gpu / 2**30:.2f} GiB per GPU, {cpu / 2**30:.2f} GiB CPU "
            "(DeepSpeed estimator, full fine-tuning upper bound; LoRA needs less)")


def extension_build_locks() -> list[str]:
    """The `lock` files of torch's JIT-built extensions (DeepSpeed builds its CPU shared-memory
    communication op this way on first use), where torch.utils.cpp_extension puts them."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return glob.glob(os.path.join(root, "*", "lock"))
    from torch.utils.cpp_extension import get_default_build_root

    return glob.glob(os.path.join(get_default_build_root(), "*", "*", "lock"))


def held_open(path: str) -> bool | None:
    """Whether some process has `path` open (Linux /proc); None when that cannot be told."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = os.path.join("/proc", pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:  # the process ended
            continue
        except PermissionError:  # another user's process: it might hold the lock
            return None
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    return True
            except OSError:
                continue
    return False


def clear_stale_build_locks(min_age_seconds: float = 30.0) -> list[str]:
    """Remove extension build locks that no process holds; return their paths.

    torch takes the lock by creating the file and keeps it open while it builds; a build that
    is killed (Ctrl-C during a first DeepSpeed run) leaves the file behind, and every later run
    waits on it forever. A lock younger than `min_age_seconds` is left to its builder."""
    removed = []
    for lock in extension_build_locks():
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            continue
        if age < min_age_seconds:
            continue
        held = held_open(lock)
        if held is None:
            log.warning("build lock %s is %.0f s old and may be stale: if this run waits at "
                        "DeepSpeed's start, stop it and delete that file", lock, age)
        elif not held:
            try:
                os.remove(lock)
            except FileNotFoundError:
                continue
            removed.append(lock)
            log.warning("removed a stale build lock %s (left by a killed build; no process "
                        "holds it), which would have made DeepSpeed wait forever", lock)
    return removed
