"""Losses for imbalanced labels, as `Trainer(compute_loss_func=...)` callables.

The Trainer passes `num_items_in_batch`: the number of labelled rows in the whole accumulated batch
(across ranks when it averages over devices). Each loss sums per-row terms and divides by it, so a
gradient-accumulated step equals one big batch; the Trainer then skips its own division by the
accumulation steps (transformers 5, see `Trainer.training_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(label_ids: Sequence[int], num_labels: int, alpha: float, weight_min: float,
                  weight_max: float, enabled: bool = True) -> np.ndarray:
    """Inverse frequency -> power alpha -> clip to [weight_min, weight_max] -> mean 1.

    Classes absent from `label_ids` (e.g. dummy label slots) count as 1 row: they get the largest
    weight, which is harmless because no row carries them. Uniform weights when not `enabled`.
    """
    if not enabled:
        return np.ones(num_labels, dtype=np.float64)
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=num_labels)
    frequency = np.maximum(counts, 1) / max(len(label_ids), 1)
    weights = np.clip((1.0 / frequency) ** alpha, weight_min, weight_max)
    return weights / weights.mean()


class ClassificationLoss:
    """Cross-entropy (optionally class-weighted, label-smoothed) or focal loss on the logits."""

    def __init__(self, name: str = "ce", weights: np.ndarray | None = None, gamma: float = 2.0,
                 label_smoothing: float = 0.0):
        self.name = name
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def per_row(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weight = None if self.weights is None else self.weights.to(logits.device)
        if self.name == "focal":
            # -sum_k q_k (1 - p_k)^gamma log p_k, q the (smoothed) one-hot target: with no
            # smoothing, -(1 - p_y)^gamma log p_y.
            log_p = F.log_softmax(logits, dim=-1)
            target = F.one_hot(labels, logits.shape[-1]).to(log_p.dtype)
            target = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
            loss = -(target * (1 - log_p.exp()) ** self.gamma * log_p).sum(dim=-1)
            return loss * weight[labels] if weight is not None else loss
        return F.cross_entropy(logits, labels, weight=weight, reduction="none",
                               label_smoothing=self.label_smoothing)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = self.per_row(logits, labels).sum()
        if num_items_in_batch is None:  # evaluation: a plain per-batch mean
            return total / max(labels.numel(), 1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def build_loss(loss_cfg, train_label_ids: Sequence[int], num_labels: int) -> ClassificationLoss:
    weighted = loss_cfg.name == "weighted_ce" or (loss_cfg.name == "focal"
                                                   and loss_cfg.use_class_weights)
    weights = None
    if weighted:
        weights = class_weights(train_label_ids, num_labels, loss_cfg.alpha, loss_cfg.weight_min,
                                loss_cfg.weight_max, enabled=loss_cfg.use_class_weights)
    return ClassificationLoss(loss_cfg.name if loss_cfg.name == "focal" else "ce", weights,
                              loss_cfg.gamma, loss_cfg.label_smoothing)
