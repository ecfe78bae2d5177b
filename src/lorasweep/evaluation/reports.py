"""Per-class report (CSV + JSON), confusion matrix and per-class F1 plots for the test split."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np

from lorasweep.evaluation.metrics import per_class_report

REPORT_DIR = "reports"
TOP_K = 20  # classes shown in the confusion matrix; the rest fold into "other"


def pyplot():
    """matplotlib's pyplot on the Agg backend: every plot lorasweep draws is a file, and training
    nodes have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_reports(run_dir: str, predictions: Sequence[int], references: Sequence[int],
                  labels: list[str], top_k: int = TOP_K) -> list[str]:
    out_dir = os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    rows = per_class_report(predictions, references, labels)
    paths = [os.path.join(out_dir, "per_class_test.csv"),
             os.path.join(out_dir, "per_class_test.json"),
             os.path.join(out_dir, "confusion_matrix_test.png"),
             os.path.join(out_dir, "per_class_f1_test.png")]
    with open(paths[0], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["label", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(rows)
    with open(paths[1], "w") as fh:
        json.dump(rows, fh, indent=2)
    plot_confusion(paths[2], predictions, references, labels, top_k)
    plot_per_class_f1(paths[3], rows)
    return paths


def confusion_top_k(predictions: Sequence[int], references: Sequence[int], labels: list[str],
                    top_k: int):
    """Confusion counts over the `top_k` classes by test support, the rest folded into "other"."""
    references, predictions = np.asarray(references), np.asarray(predictions)
    ids, support = np.unique(references, return_counts=True)
    keep = ids[np.argsort(-support, kind="stable")][:top_k].tolist()
    names = [labels[i] for i in keep]
    index = {label_id: i for i, label_id in enumerate(keep)}
    other = len(keep)
    has_other = len(ids) > top_k or bool(set(predictions.tolist()) - set(keep))
    size = len(keep) + (1 if has_other else 0)
    matrix = np.zeros((size, size), dtype=np.int64)
    for t, p in zip(references, predictions, strict=True):
        matrix[index.get(int(t), other), index.get(int(p), other)] += 1
    return matrix, names + (["other"] if has_other else [])


def plot_confusion(path: str, predictions, references, labels, top_k: int) -> None:
    plt = pyplot()
    matrix, names = confusion_top_k(predictions, references, labels, top_k)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix (row-normalised colour, counts in cells; top {top_k} "
                 "classes by support)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class_f1(path: str, rows: list[dict]) -> None:
    plt = pyplot()
    rows = sorted(rows, key=lambda r: -r["support"])
    height = max(4.0, 0.28 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(8, height))
    ax.barh([f"{r['label']} (n={r['support']})" for r in rows], [r["f1"] for r in rows],
            color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on the test split")
    ax.set_title("Per-class F1, classes ordered by test support", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_predictions(run_dir: str, split: str, rows, texts: list[str],
                      probabilities: np.ndarray, labels: list[str], label_column: str) -> str:
    """Per-row predictions of a split, in the split's row order: for error analysis, and the
    reference that a reloaded adapter must reproduce."""
    import pandas as pd

    out_dir = os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    pred = probabilities.argmax(axis=-1)
    frame = pd.DataFrame({
        "row": np.arange(len(pred)),
        "text": texts,
        "label": rows[label_column],
        "pred_label": [labels[i] for i in pred],
        "pred_score": probabilities.max(axis=-1),
    })
    path = os.path.join(out_dir, f"predictions_{split}.csv")
    frame.to_csv(path, index=False)
    return path
