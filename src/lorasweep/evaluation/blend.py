"""The fine-tuned model blended with the run's TF-IDF baseline: a wide (sparse n-gram) and deep
(transformer) ensemble, the two models' log-probabilities mixed with one weight.

    p_blend ∝ p_model ** w * p_tfidf ** (1 - w)

w is chosen on the validation split (a grid from 0 to 1) by the objective's metric; test is
scored with that w. The two models err differently: n-grams catch the surface of names and
codes, the encoder their meaning (README "Measured" compares the blend with both).
A run saves the blend (the TF-IDF model, no pickle, and w) in blend/, and predict applies it;
export writes the transformer alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence

import numpy as np

from lorasweep.config import METRIC_NAMES
from lorasweep.evaluation.baseline import (
    SavedTfidf,
    save_tfidf,
    tfidf_probabilities,
    tfidf_size_bytes,
)
from lorasweep.evaluation.metrics import classification_metrics, scored_metrics
from lorasweep.outputs import BLEND_DIR, atomic_path

log = logging.getLogger(__name__)

BLEND_JSON = "blend.json"
WEIGHTS = np.round(np.linspace(0.0, 1.0, 11), 2)  # the model's weight; 0 = TF-IDF alone
EPSILON = 1e-9  # a probability of exactly 0 (a class the baseline never saw) stays finite
# Above this size of the TF-IDF model (classes x n-gram features x 4 bytes) the run does not
# blend: blend/ would outweigh the model many times over.
MAX_BLEND_BYTES = 256 * 2**20


def blend_fits(tfidf_model) -> bool:
    size = tfidf_size_bytes(tfidf_model)
    if size > MAX_BLEND_BYTES:
        log.info("blend: skipped, the TF-IDF model would take %d MB on disk (> %d MB); the run "
                 "reports the baseline beside the model", size // 2**20, MAX_BLEND_BYTES // 2**20)
        return False
    return True


def blend_probabilities(model: np.ndarray, tfidf: np.ndarray, weight: float) -> np.ndarray:
    """Normalised p_model ** weight * p_tfidf ** (1 - weight), row by row."""
    scores = weight * np.log(model + EPSILON) + (1.0 - weight) * np.log(tfidf + EPSILON)
    scores -= scores.max(axis=1, keepdims=True)
    probabilities = np.exp(scores)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Mean negative log-probability of the true class, rounded so that equal blends tie."""
    true = probabilities[np.arange(len(probabilities)), np.asarray(labels)]
    return round(float(-np.log(true + EPSILON).mean()), 9)


def choose_weight(model: np.ndarray, tfidf: np.ndarray, labels: Sequence[int],
                  objective: str) -> float:
    """The grid weight whose blend scores best on these (validation) rows by the objective's
    metric (macro-F1 when the objective is not one of the classification metrics). A metric
    over a few hundred rows ties often (on the sample ledger, the model alone, TF-IDF alone and
    every blend between score the same); ties go to the blend with the lower log-loss, whose
    probabilities fit the rows better, then to the larger weight, the model's side."""
    name = objective.split("_", 1)[-1]
    name = name if name in METRIC_NAMES else "f1_macro"

    def rank(weight: float) -> tuple:
        probabilities = blend_probabilities(model, tfidf, weight)
        metric = classification_metrics(probabilities.argmax(axis=1), labels)[name]
        return metric, -log_loss(probabilities, labels), weight

    return float(max(WEIGHTS, key=rank))


def blend_metrics(model_probs: dict[str, np.ndarray], tfidf_probs: dict[str, np.ndarray],
                  labels: dict[str, Sequence[int]], objective: str) -> dict[str, float]:
    """`blend_weight` (chosen on "eval") and `<split>_blend_<metric>` for "eval" and "test"."""
    weight = choose_weight(model_probs["eval"], tfidf_probs["eval"], labels["eval"], objective)
    metrics: dict[str, float] = {"blend_weight": weight}
    for prefix in ("eval", "test"):
        predictions = blend_probabilities(model_probs[prefix], tfidf_probs[prefix],
                                          weight).argmax(axis=1)
        metrics.update(scored_metrics(predictions, labels[prefix], prefix, "blend_"))
    log.info("blend: model weight %.1f, TF-IDF %.1f (chosen on validation): eval macro-F1 %.4f",
             weight, 1.0 - weight, metrics["eval_blend_f1_macro"])
    return metrics


def save_blend(run_dir: str, tfidf_model, weight: float | None) -> None:
    """Write blend/ (written whole in a temp dir, then renamed); `tfidf_model` None removes a
    blend/ left by an earlier run into this dir, which would not fit the new model."""
    directory = os.path.join(run_dir, BLEND_DIR)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    if tfidf_model is None:
        return
    with atomic_path(directory) as tmp:
        save_tfidf(tfidf_model, tmp)
        with open(os.path.join(tmp, BLEND_JSON), "w") as fh:
            json.dump({"model_weight": weight}, fh)


class SavedBlend:
    """A run's blend/ read back: `apply(texts, model_probabilities)` -> blended probabilities."""

    def __init__(self, run_dir: str):
        directory = os.path.join(run_dir, BLEND_DIR)
        with open(os.path.join(directory, BLEND_JSON)) as fh:
            self.weight = float(json.load(fh)["model_weight"])
        self.tfidf = SavedTfidf(directory)

    @staticmethod
    def exists(run_dir: str) -> bool:
        return os.path.isfile(os.path.join(run_dir, BLEND_DIR, BLEND_JSON))

    def apply(self, texts: Sequence[str], model_probabilities: np.ndarray) -> np.ndarray:
        tfidf = tfidf_probabilities(self.tfidf, texts, model_probabilities.shape[1])
        return blend_probabilities(model_probabilities, tfidf, self.weight)
