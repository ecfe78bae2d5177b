"""Head warm start: a linear probe of the frozen model, fitted before training, becomes the head.

A randomly initialised head gets a few hundred SGD steps while the encoder's features drift
under it; fitting the head first and then fine-tuning (LP-FT, Kumar et al., ICLR 2022) starts
training from a head that already separates the classes. The probe's own validation and test
scores come for free: they are the "frozen encoder + linear classifier" baseline.

What the probe sees is exactly what the head consumes, captured with a hook on the head's last
Linear layer: BERT-style models, the pooler output; decoder models (`score`), the hidden state of
the last non-pad token, selected as `*ForSequenceClassification` selects it; two-layer heads
(RoBERTa's dense + out_proj), the input of out_proj, so only that last layer is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorasweep import distributed
from lorasweep.config import HEAD_NAMES
from lorasweep.data.batching import length_order, token_batches
from lorasweep.evaluation.baseline import LBFGS_MAX_ITER, fit_capped
from lorasweep.evaluation.metrics import scored_metrics
from lorasweep.model.precision import Precision, autocast

log = logging.getLogger(__name__)

C = 1.0  # on features scaled to unit average variance
ABSENT_LOGIT = 10.0  # classes with no train row (dummy slots) start this far below the others


def head_layer(model, num_labels: int) -> nn.Linear:
    """The Linear layer that outputs the logits: `classifier` / `score`, or a two-layer head's
    `out_proj`; else the last Linear layer with `num_labels` outputs."""
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        module = getattr(module, "out_proj", module)
        if isinstance(module, nn.Linear):
            return module
    found = [m for m in model.modules() if isinstance(m, nn.Linear)
             and m.out_features == num_labels]
    if not found:
        raise RuntimeError(f"no classification head found in {type(model).__name__}: "
                           "set model.head_init=random")
    return found[-1]


def full_parameters(model):
    """Under ZeRO-3, gather every parameter on every rank for the duration (rank 0's changes are
    broadcast on exit, so all ranks end with the same head); elsewhere, nothing to do."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def head_inputs(model, head: nn.Linear, dataset, collator, batch_size: int,
                pad_token_id: int | None, precision: Precision | None = None,
                progress: str | None = None) -> np.ndarray:
    """One row per dataset row: the vector the head multiplies, in dataset order, computed in
    `precision` (None: fp32). `progress`: a bar with that name and rows/s, on rank 0 and on a
    terminal only; None: no bar."""
    captured = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    columns = [c for c in dataset.column_names if c != "labels"]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = length_order(lengths)  # similar lengths together, batches cut by padded tokens
    ordered = dataset.select_columns(columns).select(order)
    device = next(model.parameters()).device
    rows = []
    bar = tqdm(total=len(ordered), desc=progress, unit="rows", leave=False,
               disable=True if progress is None or not distributed.is_rank_zero() else None)
    try:
        for span in token_batches([lengths[i] for i in order], batch_size):
            chunk = ordered[span.start:span.stop]  # column -> list, one Arrow read a batch
            batch = collator([dict(zip(chunk, values, strict=True))
                              for values in zip(*chunk.values(), strict=True)])
            batch = {k: v.to(device) for k, v in batch.items()}
            captured.clear()
            with autocast(precision, device):
                model(**batch)
            rows.append(_pooled(captured[-1], batch["input_ids"], pad_token_id).float().cpu())
            bar.update(len(batch["input_ids"]))
    finally:
        hook.remove()
        bar.close()
    features = torch.cat(rows).numpy()
    unsorted = np.empty_like(features)
    unsorted[order] = features
    return unsorted


def _pooled(hidden: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None):
    """A decoder's head sees every position: keep the last non-pad token's, as HF does."""
    if hidden.dim() == 2:
        return hidden
    non_pad = (input_ids != pad_token_id).int() if pad_token_id is not None \
        else torch.ones_like(input_ids, dtype=torch.int)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    last = (positions * non_pad).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def fit_probe(features: np.ndarray, labels: np.ndarray, num_labels: int, with_bias: bool,
              class_weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Multinomial logistic regression on centred features scaled to unit average variance,
    folded back into a head's (weight [num_labels, hidden], bias [num_labels] or None) for the
    raw features. One scale for all dimensions, not one each: a near-constant dimension would
    otherwise get a huge weight, and the first fine-tuning steps, which move it, huge logits."""
    from sklearn.linear_model import LogisticRegression

    scale = float(features.std(axis=0).mean()) + 1e-6
    shift = features.mean(axis=0) if with_bias else np.zeros(features.shape[1])
    present = np.unique(labels)
    weight_of = None if class_weights is None else {int(c): float(class_weights[c])
                                                    for c in present}
    probe = LogisticRegression(C=C, max_iter=LBFGS_MAX_ITER, fit_intercept=with_bias,
                               class_weight=weight_of)
    fit_capped(probe, (features - shift) / scale, labels)
    coef, intercept = probe.coef_, probe.intercept_ if with_bias else np.zeros(len(present))
    if len(present) == 2:  # scikit-learn keeps one row for two classes: logit(b) - logit(a)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-1, 1]) * intercept[0] / 2
    weight = np.zeros((num_labels, features.shape[1]))
    weight[present] = coef / scale
    bias = np.zeros(num_labels)
    bias[present] = intercept - weight[present] @ shift
    absent = np.setdiff1d(np.arange(num_labels), present)
    if with_bias:
        bias[absent] = bias[present].min() - ABSENT_LOGIT
    else:  # no bias to push them down: point them away from the average row instead
        mean = features.mean(axis=0)
        weight[absent] = -ABSENT_LOGIT * mean / max(float(mean @ mean), 1e-6)
    return weight, (bias if with_bias else None)


def set_head(head: nn.Linear, weight: np.ndarray, bias: np.ndarray | None) -> None:
    head.weight.data.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
    if bias is not None:
        head.bias.data.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def head_digest(weight: np.ndarray, bias: np.ndarray | None) -> str:
    """A short fingerprint of a head's values (float32), to compare heads across ranks/files."""
    digest = hashlib.sha256(np.asarray(weight, np.float32).tobytes())
    if bias is not None:
        digest.update(np.asarray(bias, np.float32).tobytes())
    return digest.hexdigest()[:12]


def probe_scores(features: np.ndarray, labels, weight, bias, prefix: str) -> dict[str, float]:
    logits = features @ weight.T + (0 if bias is None else bias)
    return scored_metrics(logits.argmax(-1), labels, prefix, "probe_")


def warm_start_head(model, tokenized, collator, num_labels: int, pad_token_id: int | None,
                    class_weights: np.ndarray | None, batch_size: int,
                    precision: Precision | None = None, progress: bool = True
                    ) -> dict[str, float]:
    """Fit the probe on the train split and copy it into the head; return the probe's scores
    (`eval_probe_*`, `test_probe_*`) and its cost. Call on every rank, before LoRA wraps the
    model (PEFT's modules_to_save copies the head as it is then) and before the Trainer builds
    its optimizer (DeepSpeed keeps its own copy of the weights from then on). `precision`: the
    run's (the probe sees what training and evaluation compute); `progress`: a bar per split."""
    started = time.perf_counter()
    head = head_layer(model, num_labels)
    was_training = model.training
    model.eval()
    with full_parameters(model):
        _to_accelerator(model)
        features = {split: head_inputs(model, head, tokenized[split], collator, batch_size,
                                       pad_token_id, precision,
                                       f"warm start: encode {split}" if progress else None)
                    for split in ("train", "validation", "test")}
        encoded = time.perf_counter()
        labels = {split: np.asarray(tokenized[split]["labels"]) for split in features}
        weight, bias = fit_probe(features["train"], labels["train"], num_labels,
                                 head.bias is not None, class_weights)
        if distributed.world_size() > 1:  # every rank starts from rank 0's head
            weight, bias = distributed.broadcast_from_rank_zero((weight, bias))
        set_head(head, weight, bias)
    model.train(was_training)
    scores = {**probe_scores(features["validation"], labels["validation"], weight, bias, "eval"),
              **probe_scores(features["test"], labels["test"], weight, bias, "test"),
              "probe_seconds": time.perf_counter() - started}
    encoded_rows = sum(len(split_labels) for split_labels in labels.values())
    log.info("head warm start: linear probe on %d train rows (encode %d rows in %.1f s, "
             "%.0f rows/s; fit %.1f s), eval macro-F1 %.4f, head %s", len(labels["train"]),
             encoded_rows, encoded - started, encoded_rows / max(encoded - started, 1e-9),
             time.perf_counter() - encoded, scores["eval_probe_f1_macro"],
             head_digest(weight, bias))
    return scores


def _to_accelerator(model) -> None:
    """from_pretrained leaves the model on the CPU (the Trainer moves it later); encoding the
    train split is much faster on the GPU. ZeRO-3 parameters already live there."""
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(torch.device("cuda", distributed.local_rank()))
