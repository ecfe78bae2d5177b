"""The Hydra callbacks every command's config names (`hydra.callbacks` in conf/train.yaml): they run
in the Hydra process around each job, before any lorasweep code.

- `MaskHydraCopies`: the copies of the config Hydra writes for a job (`.hydra/*.yaml`, a grid
  sweep's `multirun.yaml`) rewritten with their secrets masked, before any training.
- `RunDirCheck`: a run or sweep dir that cannot be created is one line and exit code 2, not
  Hydra's traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from lorasweep.cli.harness import exit_with_user_error
from lorasweep.errors import ConfigError
from lorasweep.outputs import atomic_path
from lorasweep.redaction import mask_overrides, masked_container, override_key


def mask_yaml_file(path: str, extra: Iterable[str] = ()) -> bool:
    """Rewrite a YAML file Hydra saved (a config, Hydra's own config, or the overrides list)
    with its secrets masked; True if anything was. The file is replaced whole (temp + rename)."""
    node = OmegaConf.load(path)
    original = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, ListConfig):  # overrides.yaml
        masked: Any = mask_overrides(original, extra)
    else:
        masked = masked_container(node, extra, resolve=False)
        if isinstance(masked.get("hydra"), dict):
            _mask_hydra_node(masked["hydra"], extra)
    if masked == original:
        return False
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(masked), tmp)
    return True


def _mask_hydra_node(hydra: dict, extra: Iterable[str]) -> None:
    """The overrides Hydra keeps in its config, and `job.override_dirname` made from them
    (Hydra's own recipe: sorted overrides minus excluded keys, `=` replaced by kv_sep)."""
    overrides = hydra.get("overrides") or {}
    for name in ("task", "hydra"):
        if isinstance(overrides.get(name), list):
            overrides[name] = mask_overrides(overrides[name], extra)
    job = hydra.get("job") or {}
    dirname_cfg = (job.get("config") or {}).get("override_dirname")
    if isinstance(job.get("override_dirname"), str) and dirname_cfg:
        lines = sorted(o for o in overrides.get("task") or []
                       if override_key(o) not in (dirname_cfg.get("exclude_keys") or []))
        joined = str(dirname_cfg.get("item_sep", ",")).join(lines)
        job["override_dirname"] = joined.replace("=", str(dirname_cfg.get("kv_sep", "=")))


def hydra_copies(config: DictConfig) -> list[str]:
    """The files Hydra wrote for this job: `<run dir>/.hydra/*.yaml`, and a grid sweep's
    `multirun.yaml` in the sweep dir."""
    paths = []
    if config.hydra.output_subdir is not None:
        folder = os.path.join(config.hydra.runtime.output_dir, config.hydra.output_subdir)
        paths += [os.path.join(folder, n) for n in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if config.hydra.mode == RunMode.MULTIRUN:
        paths.append(os.path.join(config.hydra.sweep.dir, "multirun.yaml"))
    return [p for p in paths if os.path.isfile(p)]


class MaskHydraCopies(Callback):
    """Hydra saves the copies above, secrets included, just before `on_job_start`, in every
    process that runs the job (each rank of a launched run writes them again). Masking them
    here, in the process that wrote them, leaves none unmasked, whatever the rank order, and
    before any training: a crash later cannot leave a secret behind."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        extra = OmegaConf.select(config, "tracking.secret_keys", default=None) or []
        for path in hydra_copies(config):
            mask_yaml_file(path, extra)


def uncreatable_reason(path: str) -> str | None:
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
