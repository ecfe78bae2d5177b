"""Prediction with a finished run: class probabilities for texts, batched in length-sorted order
and returned in the input's order, and a table's rows with their predicted labels and scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lorasweep.data.labels import label_to_text
from lorasweep.data.serialization import serialize_batch
from lorasweep.errors import DataError
from lorasweep.evaluation.metrics import classification_metrics
from lorasweep.model.precision import Precision, autocast


@torch.no_grad()
def predict_probabilities(model, tokenizer, texts: Sequence[str], max_length: int,
                          batch_size: int = 64, progress: bool = False,
                          precision: Precision | None = None) -> np.ndarray:
    """Class probabilities for `texts`, row i for text i, computed in `precision` (None: fp32;
    predict passes the run's rule, `lorasweep.model.precision.resolve`).

    Texts are batched by token length (little padding, fast), then put back in input order.
    """
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    device = next(model.parameters()).device
    probabilities: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="predict", disable=not progress):
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        with autocast(precision, device):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        rows = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        for row, probs in zip(idx, rows, strict=True):
            probabilities[row] = probs
    return np.stack(probabilities) if probabilities else np.zeros((0, 0))


def check_input_columns(columns: list[str], settings: dict[str, Any], path: str) -> None:
    """The input table has every column the run serialized in training."""
    missing = [c for c in settings["text_columns"] if c not in columns]
    if missing:
        raise DataError(f"input={path}: missing column(s) used in training: {', '.join(missing)} "
                        f"(columns: {', '.join(columns)})")


def top_k_frame(probabilities, labels: list[str], top_k: int):
    """pred_label / pred_score and top<i>_label / top<i>_score columns, one row per input row."""
    import pandas as pd

    k = min(top_k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    names = np.asarray(labels, dtype=object)
    columns = {"pred_label": names[order[:, 0]],
               "pred_score": np.take_along_axis(probabilities, order[:, :1], axis=1)[:, 0]}
    for i in range(k):
        columns[f"top{i + 1}_label"] = names[order[:, i]]
        columns[f"top{i + 1}_score"] = np.take_along_axis(probabilities, order[:, i:i + 1],
                                                          axis=1)[:, 0]
    return pd.DataFrame(columns)


def predict_table(model, tokenizer, labels: list[str], settings: dict[str, Any], table,
                  max_length: int, batch_size: int = 64, top_k: int = 3, progress: bool = False,
                  blend=None, precision: Precision | None = None):
    """The input rows (a `datasets.Dataset`) as a DataFrame, plus the prediction columns.
    `blend`: a `SavedBlend` to combine the model's probabilities with, or None."""
    import pandas as pd

    texts = serialize_batch(table.to_dict(), settings)
    probabilities = predict_probabilities(model, tokenizer, texts, max_length, batch_size,
                                          progress=progress, precision=precision)
    if blend is not None:
        probabilities = blend.apply(texts, probabilities)
    frame = table.to_pandas()
    predictions = top_k_frame(probabilities, labels, top_k)
    # Prediction columns replace same-named input columns (e.g. re-scoring a predictions file).
    frame = frame.drop(columns=[c for c in predictions.columns if c in frame.columns])
    return pd.concat([frame.reset_index(drop=True), predictions], axis=1)


def label_metrics(frame, label_column: str, labels: list[str]) -> dict[str, float] | None:
    """Accuracy and macro-F1 against the input's label column, when it has one."""
    if label_column not in frame.columns:
        return None
    label2id = {name: i for i, name in enumerate(labels)}
    pairs = [(label_to_text(t), p)
             for t, p in zip(frame[label_column], frame["pred_label"], strict=True)
             if t is not None and str(t).strip() and str(t) != "nan"]
    if not pairs:
        return None
    # A label the run never saw gets id -1: always wrong, and a class of its own in macro-F1.
    references = [label2id.get(t, -1) for t, _ in pairs]
    predictions = [label2id[p] for _, p in pairs]
    result = classification_metrics(predictions, references)
    return {"rows": len(pairs), "unknown_labels": sum(r < 0 for r in references),
            "accuracy": result["accuracy"], "f1_macro": result["f1_macro"]}
