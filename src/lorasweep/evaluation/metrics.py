"""Classification metrics through `evaluate`, computed by scikit-learn, with no hub access.

`evaluate.load("accuracy")` downloads its script; this module defines the metric as an
`evaluate.Metric` subclass instead, so it runs with no hub access.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)


class ClassificationMetrics(evaluate.Metric):
    """accuracy, f1_macro, f1_weighted, precision_macro, recall_macro (zero_division=0).

    Macro averages run over the classes present in references or predictions (scikit-learn's
    default), so unused label slots do not drag the macro scores down.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.__doc__, citation="", inputs_description="class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        y_pred, y_true = np.asarray(predictions), np.asarray(references)
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
            "precision_macro": float(precision_score(y_true, y_pred, average="macro",
                                                     zero_division=0)),
            "recall_macro": float(recall_score(y_true, y_pred, average="macro", zero_division=0)),
        }


_METRIC: ClassificationMetrics | None = None


def classification_metrics(predictions: Sequence[int],
                           references: Sequence[int]) -> dict[str, float]:
    global _METRIC
    if _METRIC is None:
        _METRIC = ClassificationMetrics()
    return _METRIC.compute(predictions=predictions, references=references)


def scored_metrics(predictions: Sequence[int], references: Sequence[int], prefix: str,
                   variant: str) -> dict[str, float]:
    """`<prefix>_<variant><metric>` for each metric: how a scored model other than the fine-tuned
    one (config.SCORED_VARIANTS: "baseline_", "probe_", "blend_") names its scores."""
    scores = classification_metrics(predictions, references)
    return {f"{prefix}_{variant}{name}": value for name, value in scores.items()}


def compute_metrics(eval_pred) -> dict[str, float]:
    """The Trainer's `compute_metrics`: logits and label ids in, metric dict out."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return classification_metrics(np.argmax(logits, axis=-1), labels)


def per_class_report(predictions: Sequence[int], references: Sequence[int],
                     labels: list[str]) -> list[dict]:
    """precision / recall / f1 / support per class that occurs in references or predictions."""
    present = sorted(set(np.asarray(references).tolist()) | set(np.asarray(predictions).tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=present, zero_division=0)
    return [{"label": labels[i], "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)}
            for i, p, r, f, s in zip(present, precision, recall, f1, support, strict=True)]


def hierarchy_metrics(predictions: Sequence[int], references: Sequence[int], labels: list[str],
                      prefixes: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 after rolling codes up to their first `p` characters (51100 -> 5)."""
    out = {}
    for p in prefixes:
        y_pred = [labels[i][:p] for i in predictions]
        y_true = [labels[i][:p] for i in references]
        out[f"prefix{p}_accuracy"] = float(accuracy_score(y_true, y_pred))
        out[f"prefix{p}_f1_macro"] = float(f1_score(y_true, y_pred, average="macro",
                                                    zero_division=0))
    return out
