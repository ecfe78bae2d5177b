"""Reading a finished run back: its config, label map, row serializer, tokenizer and model.

predict and export both start here; lorasweep.outputs says where each file of a run dir lives.
torch, transformers and datasets are imported by the functions that need them, so a tool can
check its arguments (and the run dir) before paying for those imports.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorasweep import outputs
from lorasweep.config import TrainConfig
from lorasweep.data.labels import LabelMap
from lorasweep.data.serialization import serialization_settings
from lorasweep.errors import ConfigError, DataError, UserError


def check_run_dir(run_dir: str) -> None:
    """A finished run: every file predicting needs is on disk, as its run_complete.json lists
    them. A run that died while training or while writing its outputs (a full disk) is refused,
    never used with what it happens to have."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir}: not a directory")
    reason = outputs.unfinished_reason(run_dir)
    if reason is not None:
        raise UserError(f"run_dir={run_dir}: not a finished run: {reason}; rerun its training "
                        "command to finish it (it resumes from its last checkpoint)")


def load_run_config(run_dir: str) -> DictConfig:
    """The run's saved config, merged over the schema (a key added since then gets its default)."""
    path = os.path.join(run_dir, outputs.RUN_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"run_dir={run_dir}: no {outputs.RUN_CONFIG}; "
                        "is this a finished lorasweep run?")

    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))


def load_label_map(run_dir: str) -> LabelMap:
    return LabelMap.from_json(outputs.read_json(run_dir, outputs.LABEL_MAP))


def run_serialization(run_dir: str, cfg: DictConfig) -> dict[str, Any]:
    """The exact serializer settings the run trained with (text columns resolved)."""
    meta_path = os.path.join(run_dir, outputs.DATASET_METADATA)
    if os.path.isfile(meta_path):
        settings = outputs.read_json(run_dir, outputs.DATASET_METADATA).get("serialization")
        if settings:
            return settings
    if not cfg.data.text_columns:  # "every column but the label" needs the training table
        raise DataError(f"run_dir={run_dir}: no {outputs.DATASET_METADATA} with the text columns")
    return serialization_settings(cfg.data, cfg.data.text_columns)


def load_model(run_dir: str, cfg: DictConfig, label_map, tokenizer):
    """Base model + the run's adapter (adapter/), or the fully fine-tuned model (model/)."""
    from transformers import AutoModelForSequenceClassification

    from lorasweep.console import quiet_loading
    from lorasweep.model.modeling import base_model_path, build_model  # torch: on first use
    from lorasweep.model.pooling import apply_pooling

    adapter_dir = os.path.join(run_dir, outputs.ADAPTER_DIR)
    if not os.path.isdir(adapter_dir):
        # A token pooling (model.pooling=mean/cls) has no weights: the saved model lacks the
        # pooler's, which is replaced again as in training.
        pooling = run_pooling(run_dir)
        with quiet_loading() if pooling != "pooler" else contextlib.nullcontext():
            model = AutoModelForSequenceClassification.from_pretrained(
                os.path.join(run_dir, outputs.FULL_MODEL_DIR))
        return apply_pooling(model, pooling, "as the run trained")
    from peft import PeftModel

    base_path = base_model_path(cfg.model, cfg.data.cache_dir, cfg.seed)
    if not os.path.isdir(base_path) and cfg.model.arch is None:
        # Not found as configured here: the base the run loaded, as model_metadata.json says.
        meta = outputs.read_json(run_dir, outputs.MODEL_METADATA)
        base_path = meta.get("base_model", base_path)
    base = build_model(cfg.model, label_map, tokenizer, base_path)
    return PeftModel.from_pretrained(base, adapter_dir)


def run_pooling(run_dir: str) -> str:
    """What the run's head read (model_metadata.json; runs before model.pooling: the pooler)."""
    path = os.path.join(run_dir, outputs.MODEL_METADATA)
    if not os.path.isfile(path):
        return "pooler"
    return outputs.read_json(run_dir, outputs.MODEL_METADATA).get("pooling", "pooler")


def load_for_inference(run_dir: str):
    """Rebuild a trained model from its run dir: (model in eval mode, tokenizer, label map, cfg)."""
    from transformers import AutoTokenizer

    check_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    label_map = load_label_map(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, outputs.TOKENIZER_DIR))
    model = load_model(run_dir, cfg, label_map, tokenizer)
    model.eval()
    return model, tokenizer, label_map, cfg
