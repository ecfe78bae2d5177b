"""The layout of a run dir and its file helpers; runs.py reads a finished run back from it.

    <run_dir>/adapter/  (or model/ with lora=none)   tokenizer/   label_map.json   blend/
             model_metadata.json  dataset_metadata.json  metrics.json  config.yaml  .hydra/
             checkpoints/checkpoint-<step>/
"""

from __future__ import annotations

import json
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorasweep.redaction import masked_container

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
BLEND_DIR = "blend"  # the TF-IDF model and the blend weight (blend.py)
CHECKPOINT_DIR = "checkpoints"
LABEL_MAP = "label_map.json"
METRICS = "metrics.json"
MODEL_METADATA = "model_metadata.json"
DATASET_METADATA = "dataset_metadata.json"
RUN_CONFIG = "config.yaml"


def write_json(run_dir: str, name: str, payload: Any) -> str:
    """Write JSON through a temp file + rename: a reader never sees half a file."""
    path = os.path.join(run_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_json(run_dir: str, name: str) -> Any:
    with open(os.path.join(run_dir, name)) as fh:
        return json.load(fh)


def save_run_config(run_dir: str, cfg: DictConfig) -> str:
    """The resolved config, which predict/export use to rebuild the model and the serializer.
    Secrets are masked; one given as `${oc.env:VAR}` stays that interpolation (redaction.py)."""
    path = os.path.join(run_dir, RUN_CONFIG)
    OmegaConf.save(OmegaConf.create(masked_container(cfg, cfg.tracking.secret_keys)), path)
    return path

