"""Tokenizer, sequence-classification model (pretrained or random from a config), LoRA adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lorasweep import distributed
from lorasweep.config import CHOICES, HEAD_NAMES
from lorasweep.console import quiet_loading
from lorasweep.data.labels import LabelMap
from lorasweep.errors import ConfigError, one_line
from lorasweep.model.pooling import apply_pooling, resolve_pooling
from lorasweep.outputs import RERUN_HINT, atomic_path, writing

log = logging.getLogger(__name__)

# model.dtype names torch dtypes by their attribute names (torch.bfloat16, ...).
DTYPES = {name: getattr(torch, name) for name in CHOICES["model.dtype"]}


def load_tokenizer(model_cfg):
    """The model's tokenizer, with a pad token (decoder models such as Qwen ship without one)."""
    source = model_cfg.tokenizer_name_or_path or model_cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model: cannot load a tokenizer from {source!r} "
                          f"({one_line(exc)[:200]})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model: tokenizer {source!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _label_kwargs(model_cfg, label_map: LabelMap, tokenizer) -> dict:
    kwargs = dict(num_labels=len(label_map.labels), id2label=label_map.id2label,
                  label2id=label_map.label2id, problem_type="single_label_classification",
                  pad_token_id=tokenizer.pad_token_id)
    if model_cfg.classifier_dropout is not None:
        kwargs["classifier_dropout"] = model_cfg.classifier_dropout
    return kwargs


def random_base_model(model_cfg, cache_dir: str, seed: int) -> str:
    """Materialise a random-weight model (`model.arch`) once as a local dir, and return its path.

    From then on it loads through the same `from_pretrained` path as real weights, and the saved
    adapter's base is the same on every rank and every run. When to call it: see
    `lorasweep.training.pipeline.set_up`. A file lock, not a barrier, so it works before any
    process group.
    """
    arch = dict(model_cfg.arch)
    key = hashlib.sha256(json.dumps([arch, seed], sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "random_models", f"{arch['model_type']}-{key}-headless")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):
        if not os.path.isfile(os.path.join(path, "config.json")):
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
            # Its own random stream: a run that creates the model and one that finds it draw
            # the same LoRA and dropout numbers after it.
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                # Headless, like a pretrained checkpoint: the classifier is sized at load time.
                model = AutoModel.from_config(config)
            with writing(path, RERUN_HINT), quiet_loading(), atomic_path(path) as tmp:
                save_local_model(model, tmp)
    return path


def save_local_model(model, path: str) -> None:
    """A small, unpartitioned model as a checkpoint dir, written by whichever rank calls it:
    `save_pretrained` writes on global rank 0 only once torch.distributed is up, and a node
    whose cache dir is its own needs its copy too (a headless test model ties no weights)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def build_model(model_cfg, label_map: LabelMap, tokenizer, base_path: str):
    """A sequence classifier with `num_labels` slots and the label names in its config.

    When to call it (ZeRO-3 partitions at load): see `lorasweep.training.pipeline.set_up`.
    """
    try:
        with quiet_loading():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                base_path, dtype=DTYPES[model_cfg.dtype], ignore_mismatched_sizes=True,
                trust_remote_code=model_cfg.trust_remote_code, output_loading_info=True,
                **_label_kwargs(model_cfg, label_map, tokenizer))
    except OSError as exc:
        raise ConfigError(f"model.name_or_path={base_path!r}: cannot load "
                          f"({one_line(exc)[:200]})") from None
    report_new_weights(info, len(label_map.labels))
    apply_pooling(model, *resolve_pooling(model_cfg.pooling, base_path))
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def report_new_weights(info: dict, num_labels: int) -> None:
    """One line for the head we expect to be new; a warning for anything else the checkpoint
    lacked (the encoder itself starting random is worth knowing)."""
    new = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys", [])})
    heads = sorted({k.split(".")[0] for k in new if k.split(".")[0] in HEAD_NAMES})
    others = [k for k in new if k.split(".")[0] not in HEAD_NAMES]
    if heads and distributed.is_rank_zero():
        log.info("new head: %s (%d labels)", ", ".join(heads), num_labels)
    if others and distributed.is_rank_zero():
        log.warning("not in the checkpoint, initialised at random: %s%s", ", ".join(others[:8]),
                    f" and {len(others) - 8} more" if len(others) > 8 else "")


def base_model_path(model_cfg, cache_dir: str, seed: int) -> str:
    if model_cfg.arch is not None:
        return random_base_model(model_cfg, cache_dir, seed)
    return model_cfg.name_or_path


def apply_lora(model, lora_cfg):
    """Wrap the model in PEFT LoRA adapters; the classifier head stays fully trainable."""
    if not lora_cfg.enable:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    peft_config = LoraConfig(
        task_type=TaskType[lora_cfg.task_type], r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout, bias=lora_cfg.bias,
        target_modules=peft_targets(lora_cfg.target_modules),
        modules_to_save=list(lora_cfg.modules_to_save),
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules={lora_cfg.target_modules}: {exc}") from None
    if distributed.is_rank_zero():
        trainable, total = model.get_nb_trainable_parameters()
        log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)
    return model


def peft_targets(target_modules):
    """None: PEFT's default for the architecture; [all-linear]: PEFT's every-Linear-but-the-head
    shorthand (bert: query..output.dense and the pooler; qwen2: q/k/v/o and the MLP); else names."""
    if not target_modules:
        return None
    names = list(target_modules)
    return "all-linear" if names == ["all-linear"] else names


def count_parameters(model) -> dict:
    """Trainable and total parameter counts (ZeRO-3 aware: partitioned tensors report ds_numel)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return {"trainable": trainable, "total": total}

