"""The `deepspeed` config group as the plain dict `TrainingArguments(deepspeed=...)` takes.

(Named deepspeed_config, not deepspeed, so it never shadows the DeepSpeed package.)
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from lorasweep.errors import ConfigError

log = logging.getLogger(__name__)


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """`override` wins key by key, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_deepspeed_config(ds_cfg) -> Optional[Dict[str, Any]]:
    """None for `deepspeed=none`; else the group's `config`, with `config_path`'s JSON merged
    over it (the JSON wins on conflicts, as the design documents say). "auto" values stay for
    the Trainer to fill from training.*."""
    if not ds_cfg.enabled:
        return None
    config = OmegaConf.to_container(ds_cfg.config, resolve=True)
    if ds_cfg.config_path:
        try:
            with open(ds_cfg.config_path) as fh:
                external = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config_path={ds_cfg.config_path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config_path={ds_cfg.config_path}: invalid JSON "
                              f"({exc})") from None
        config = deep_merge(config, external)
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config.zero_optimization.stage={stage}: expected 0-3")
    return config


def zero_stage(ds_config: Optional[Dict[str, Any]]) -> int:
    return 0 if not ds_config else int(ds_config.get("zero_optimization", {}).get("stage", 0))
