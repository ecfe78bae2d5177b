"""Prediction with a finished run: class probabilities for texts, batched in length-sorted order
and returned in the input's order; rows (a table, or a request's columns) with their predicted
labels and scores. predict.py and the run's MLflow model (lorasweep.runs.served) both predict
through `LoadedRun`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lorasweep.data.batching import length_order, token_batches
from lorasweep.data.labels import label_to_text
from lorasweep.data.serialization import serialize_batch
from lorasweep.errors import ConfigError, DataError
from lorasweep.evaluation.blend import SavedBlend
from lorasweep.evaluation.metrics import classification_metrics
from lorasweep.model.precision import Precision, autocast, resolve
from lorasweep.runs import load as runs


@torch.no_grad()
def predict_probabilities(model, tokenizer, texts: Sequence[str], max_length: int,
                          batch_size: int = 64, progress: bool = False,
                          precision: Precision | None = None) -> np.ndarray:
    """Class probabilities for `texts`, row i for text i, computed in `precision` (None: fp32;
    predict passes the run's rule, `lorasweep.model.precision.resolve`).

    Texts are batched by token length (little padding, fast), then put back in input order.
    """
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = length_order([len(ids) for ids in encoded])
    device = next(model.parameters()).device
    probabilities: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    batches = token_batches([len(encoded[i]) for i in order], batch_size)
    for rows in tqdm(batches, desc="predict", disable=not progress):
        idx = order[rows.start:rows.stop]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        with autocast(precision, device):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        rows = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        for row, probs in zip(idx, rows, strict=True):
            probabilities[row] = probs
    return np.stack(probabilities) if probabilities else np.zeros((0, 0))


def check_input_columns(columns: Sequence[str], settings: dict[str, Any], source: str) -> None:
    """The input has every column the run serialized in training. `source` starts the message
    (`input=rows.csv`, `request`)."""
    missing = [c for c in settings["text_columns"] if c not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) used in training: {', '.join(missing)} "
                        f"(columns: {', '.join(map(str, columns))})")


def pick_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device available")
    return torch.device(name)


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


@dataclass
class LoadedRun:
    """A finished run ready to predict: its model (on a device, eval mode), tokenizer, labels,
    serializer settings, max_length, blend (None: the model alone) and the precision it computes
    in (the run's training.mixed_precision rule on this device)."""

    model: Any
    tokenizer: Any
    labels: list[str]
    settings: dict[str, Any]
    max_length: int
    blend: SavedBlend | None
    label_column: str
    precision: Precision

    @classmethod
    def load(cls, run_dir: str, device: str = "auto", max_length: int | None = None,
             blend: bool = True) -> LoadedRun:
        """`max_length` None: the run's data.max_length; `blend` False: the model alone even
        when the run saved a blend."""
        model, tokenizer, label_map, cfg = runs.load_for_inference(run_dir)
        target = pick_device(device)
        model.to(target)
        saved = SavedBlend(run_dir) if blend and SavedBlend.exists(run_dir) else None
        # bf16 where the run computed in bf16 and this hardware has it too
        precision = resolve(cfg.training.mixed_precision, target.type)
        return cls(model, tokenizer, label_map.labels, runs.run_serialization(run_dir, cfg),
                   max_length or cfg.data.max_length, saved, cfg.data.label_column, precision)

    def predict(self, rows: dict[str, list], batch_size: int = 64, top_k: int = 3,
                progress: bool = False):
        """The prediction columns (`top_k_frame`) for `rows` (column name -> values), one row
        per input row, in input order; no rows give an empty frame with those columns."""
        texts = serialize_batch(rows, self.settings)
        if not texts:
            return top_k_frame(np.zeros((0, len(self.labels))), self.labels, top_k)
        probabilities = predict_probabilities(self.model, self.tokenizer, texts, self.max_length,
                                              batch_size, progress=progress,
                                              precision=self.precision)
        if self.blend is not None:
            probabilities = self.blend.apply(texts, probabilities)
        return top_k_frame(probabilities, self.labels, top_k)


def predict_table(run: LoadedRun, table, batch_size: int = 64, top_k: int = 3,
                  progress: bool = False):
    """The input rows (a `datasets.Dataset`) as a DataFrame, plus the prediction columns."""
    import pandas as pd

    predictions = run.predict(table.to_dict(), batch_size, top_k, progress)
    frame = table.to_pandas()
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
