"""What the classification head reads (`model.pooling`): the model's own pooler, or the mean of the
tokens / the first token, as a sentence encoder was trained to be read.

sentence-transformers checkpoints (all-MiniLM-L6-v2 and its kin) are trained for mean pooling;
the BERT pooler (first token + dense + tanh) they still carry is untrained. `auto` reads the
checkpoint's own `modules.json` and its Pooling module's `config.json`: mean (or cls) when they say
so, the model's own head otherwise (plain checkpoints, decoder models: the last non-pad token).

`mean` and `cls` replace the encoder's `pooler` module with `TokenPooler`, which has no weights:
the head (`classifier`) then multiplies the pooled tokens. Models without a `pooler` module on
their encoder (RoBERTa-style heads, decoder models) take `pooler` (or `auto`) only.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from lorasweep import distributed
from lorasweep.errors import ConfigError

log = logging.getLogger(__name__)

# sentence-transformers Pooling config keys, and the pooling each means here.
SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
TOKEN_POOLINGS = ("mean", "cls")


def checkpoint_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers checkpoint dir declares (its modules.json and the
    Pooling module's config.json): mean or cls; None when it declares none of these."""
    try:
        with open(os.path.join(path, "modules.json")) as fh:
            modules = json.load(fh)
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        with open(os.path.join(path, pooling.get("path", ""), "config.json")) as fh:
            settings = json.load(fh)
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    return next((name for key, name in SENTENCE_TRANSFORMERS_MODES.items() if settings.get(key)),
                None)


def resolve_pooling(setting: str, base_path: str) -> tuple[str, str]:
    """(pooling, why): `auto` becomes mean/cls for a sentence-transformers checkpoint dir,
    `pooler` (the model's own head) otherwise; other settings are kept."""
    if setting != "auto":
        return setting, f"model.pooling={setting}"
    found = checkpoint_pooling(base_path) if os.path.isdir(base_path) else None
    if found:
        return found, f"auto: a sentence-transformers checkpoint trained for {found} pooling"
    return "pooler", "auto: the model's own head"


class TokenPooler(nn.Module):
    """Stands in for an encoder's pooler: the mean of the real (attention-mask) tokens' last
    hidden states, or the first token's. The encoder gives its pooler the hidden states only, so
    `remember_mask`, a forward pre-hook on the encoder, keeps the batch's attention mask."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.attention_mask: torch.Tensor | None = None

    def remember_mask(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = args[1] if mask is None and len(args) > 1 else mask

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.attention_mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)

    def extra_repr(self) -> str:
        return self.mode


def apply_pooling(model, pooling: str, why: str = ""):
    """Set the model's pooling in place (`pooler`: nothing to do); returns the model."""
    if pooling not in TOKEN_POOLINGS:
        return model
    encoder = model.base_model
    if not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ConfigError(f"model.pooling={pooling}: {type(model).__name__} has no pooler "
                          "module to replace (its head reads its own features); use "
                          "model.pooling=auto or pooler")
    if isinstance(encoder.pooler, TokenPooler):
        return model
    encoder.pooler = TokenPooler(pooling)
    encoder.register_forward_pre_hook(encoder.pooler.remember_mask, with_kwargs=True)
    if distributed.is_rank_zero():
        log.info("pooling: %s of the tokens, not the model's pooler (%s)", pooling, why)
    return model


def model_pooling(model) -> str:
    """The pooling a (possibly PEFT-wrapped) model has: mean, cls or pooler."""
    for module in model.modules():
        if isinstance(module, TokenPooler):
            return module.mode
    return "pooler"
