"""The layout of a run dir, and writing files so that a reader never sees half of one.

    <run_dir>/adapter/  (or model/ with lora=none)   tokenizer/   label_map.json   blend/
             model_metadata.json  dataset_metadata.json  metrics.json  config.yaml  .hydra/
             checkpoints/checkpoint-<step>/

`lorasweep.runs.load` reads a finished run back from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorasweep.redaction import masked_container

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
BLEND_DIR = "blend"  # the TF-IDF model and the blend weight (lorasweep.evaluation.blend)
CHECKPOINT_DIR = "checkpoints"
LABEL_MAP = "label_map.json"
METRICS = "metrics.json"
MODEL_METADATA = "model_metadata.json"
DATASET_METADATA = "dataset_metadata.json"
RUN_CONFIG = "config.yaml"
PRUNED = "pruned.json"  # a sweep trial stopped by its pruner (lorasweep.training.pruning)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write a file or a directory at; when the block ends
    without an error, it takes `path`'s place in one rename, so a reader sees the old version or
    the whole new one, never a part. On an error the temporary path is removed and `path` stays
    as it was. `path` may already be a file or an empty directory (rename replaces those); a
    non-empty directory makes the rename fail with OSError."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_json(run_dir: str, name: str, payload: Any) -> str:
    path = os.path.join(run_dir, name)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    return path


def read_json(run_dir: str, name: str) -> Any:
    with open(os.path.join(run_dir, name)) as fh:
        return json.load(fh)


def save_run_config(run_dir: str, cfg: DictConfig) -> str:
    """The resolved config, which predict/export use to rebuild the model and the serializer.
    Secrets are masked; one given as `${oc.env:VAR}` stays that interpolation
    (lorasweep.redaction)."""
    path = os.path.join(run_dir, RUN_CONFIG)
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(masked_container(cfg, cfg.tracking.secret_keys)), tmp)
    return path
