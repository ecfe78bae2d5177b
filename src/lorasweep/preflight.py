"""Checks that a run can start, made before any data or model work: the config's values
(`config.validate`), the model's position limit, a run dir that can be created; and, before
DeepSpeed starts, no stale build lock that would make it wait forever.

Each failed check is a user error: one line naming the key, exit code 2. A stale lock is not the
user's doing: it is removed, with a warning line.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lorasweep.config import validate
from lorasweep.errors import ConfigError, exit_with_user_error

log = logging.getLogger(__name__)


def check_run_config(cfg: DictConfig) -> None:
    """Everything a training run checks before it reads data or loads a model."""
    validate(cfg)
    check_max_length(cfg.data.max_length, cfg.model, "data.max_length")


def model_position_limit(model_cfg) -> Optional[int]:
    """The most token positions the model takes (`max_position_embeddings`); None when that is
    unknown without loading weights (a hub id: its own load reports any problem)."""
    from transformers import AutoConfig

    try:
        if model_cfg.arch is not None:
            arch = dict(model_cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif model_cfg.name_or_path and os.path.isdir(model_cfg.name_or_path):
            config = AutoConfig.from_pretrained(model_cfg.name_or_path,
                                                trust_remote_code=model_cfg.trust_remote_code)
        else:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return getattr(config, "max_position_embeddings", None)


def check_max_length(max_length: int, model_cfg, key: str) -> None:
    """A longer input than the position embeddings would fail deep inside the model's forward."""
    limit = model_position_limit(model_cfg)
    if limit is not None and max_length > limit:
        source = model_cfg.name_or_path or f"model.arch ({model_cfg.arch.model_type})"
        raise ConfigError(f"{key}={max_length}: the model takes at most {limit} tokens "
                          f"(max_position_embeddings of {source}); set {key} <= {limit}")


def uncreatable_reason(path: str) -> Optional[str]:
    """Why `path` cannot be made a directory, or None when it can (or already is one)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(path) and os.path.isdir(probe):
        return None
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to create directories in {probe}"
    return None


class RunDirCheck(Callback):
    """Hydra creates the run (or sweep) dir before any lorasweep code runs; a path below a file
    would end in a traceback there. Hydra turns an exception in a callback into a warning, so a
    bad dir exits here, with the one-line error."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_uncreatable("hydra.run.dir", str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_uncreatable("hydra.sweep.dir", str(config.hydra.sweep.dir))


def _exit_if_uncreatable(key: str, path: str) -> None:
    reason = uncreatable_reason(path)
    if reason:
        exit_with_user_error(ConfigError(f"{key}={path}: cannot create the directory ({reason})"))


def extension_build_locks() -> List[str]:
    """The `lock` files of torch's JIT-built extensions (DeepSpeed builds its CPU shared-memory
    communication op this way on first use), where torch.utils.cpp_extension puts them."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return glob.glob(os.path.join(root, "*", "lock"))
    from torch.utils.cpp_extension import get_default_build_root

    return glob.glob(os.path.join(get_default_build_root(), "*", "*", "lock"))


def held_open(path: str) -> Optional[bool]:
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


def clear_stale_build_locks(min_age_seconds: float = 30.0) -> List[str]:
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
