"""The baseline every run is compared with: TF-IDF n-grams + logistic regression, same split.

Word 1-2-grams and character 3-5-grams (within word boundaries) over the serialized train rows,
a class-balanced multinomial logistic regression (C=10) on them (balanced, for long-tailed
labels), scored on validation and test with the same metrics as the model. It is what a user
writes in ten lines of scikit-learn; a fine-tuned model that does not beat it has not earned its
compute, and the run says so. The fitted model is also half of the run's blend
(lorasweep.evaluation.blend), saved and read back here without pickle.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

from lorasweep.evaluation.metrics import scored_metrics

log = logging.getLogger(__name__)

# Above this many train rows the baseline is skipped (with a log line): its cost grows with the
# vocabulary of n-grams, and at that size a user has no doubt that fitting it is slow.
MAX_TRAIN_ROWS = 200_000
# lbfgs iterations of every logistic regression lorasweep fits (this baseline, the head's probe):
# the cap bounds the fit's time, so the convergence warning at the cap is expected.
LBFGS_MAX_ITER = 300
TFIDF_JSON = "tfidf.json"
TFIDF_ARRAYS = "tfidf.npz"


def build_tfidf_classifier():
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, dtype=np.float32),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2,
                        dtype=np.float32))
    return make_pipeline(features, LogisticRegression(C=10.0, max_iter=LBFGS_MAX_ITER,
                                                       class_weight="balanced"))


def fit_capped(estimator, features, labels):
    """`estimator.fit(features, labels)` without the convergence warning at LBFGS_MAX_ITER."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(lbfgs|max_iter|ITERATIONS).*")
        return estimator.fit(features, labels)


def fit_tfidf(texts: Sequence[str], labels: Sequence[int]):
    """The fitted TF-IDF + logistic regression pipeline (lbfgs capped at LBFGS_MAX_ITER). Its
    coefficients are float32, like the features (scikit-learn fits in the features' dtype; the
    cast makes sure): the model that is scored is exactly the one that is saved."""
    import numpy as np

    model = fit_capped(build_tfidf_classifier(), list(texts), list(labels))
    classifier = model.steps[-1][1]
    classifier.coef_ = classifier.coef_.astype(np.float32)
    classifier.intercept_ = classifier.intercept_.astype(np.float32)
    return model


def tfidf_size_bytes(model) -> int:
    """What the fitted model's coefficients take (the bulk of a saved one)."""
    return int(model.steps[-1][1].coef_.nbytes)


def tfidf_probabilities(model, texts: Sequence[str], num_labels: int):
    """(rows, num_labels) class probabilities; label slots train never had get 0."""
    import numpy as np

    probabilities = np.zeros((len(texts), num_labels), dtype=np.float64)
    probabilities[:, model.classes_] = model.predict_proba(list(texts))
    return probabilities


def tfidf_baseline(train: tuple[Sequence[str], Sequence[int]],
                   scored: dict[str, tuple[Sequence[str], Sequence[int]]], num_labels: int
                   ) -> tuple[dict[str, float], Any, dict[str, Any]] | None:
    """Fit on `train` (texts, label ids); score each split of `scored` (`{"eval": (texts, ids),
    "test": ...}`). Returns (`<prefix>_baseline_<metric>` for each split and
    `baseline_seconds`, the fitted model, each split's class probabilities), or None when
    skipped."""
    texts, labels = train
    if len(texts) > MAX_TRAIN_ROWS:
        log.info("baseline: skipped (%d train rows > %d); set baseline=none to silence this",
                 len(texts), MAX_TRAIN_ROWS)
        return None
    if len(set(labels)) < 2:
        return None
    started = time.perf_counter()
    model = fit_tfidf(texts, labels)
    metrics: dict[str, float] = {}
    probabilities = {}
    for prefix, (split_texts, split_labels) in scored.items():
        probabilities[prefix] = tfidf_probabilities(model, split_texts, num_labels)
        metrics.update(scored_metrics(probabilities[prefix].argmax(axis=-1), split_labels,
                                      prefix, "baseline_"))
    metrics["baseline_seconds"] = time.perf_counter() - started
    log.info("baseline: TF-IDF + logistic regression, eval macro-F1 %.4f (%.1f s)",
             metrics.get("eval_baseline_f1_macro", float("nan")), metrics["baseline_seconds"])
    return metrics, model, probabilities


# What a fitted vectorizer needs to transform text again (the rest are fit-time settings).
TRANSFORM_PARAMS = ("analyzer", "ngram_range", "lowercase", "strip_accents", "token_pattern",
                    "norm", "use_idf", "smooth_idf", "sublinear_tf")


def save_tfidf(model, directory: str) -> None:
    """Write the fitted pipeline as JSON (vectorizer settings and vocabularies) + NumPy arrays
    (idf, coefficients): no pickle, so loading a run dir never runs code from it."""
    import numpy as np

    union, classifier = model.steps[0][1], model.steps[-1][1]
    arrays = {"coef": classifier.coef_, "intercept": classifier.intercept_,
              "classes": classifier.classes_}
    vectorizers = []
    for i, (_, vectorizer) in enumerate(union.transformer_list):
        params = vectorizer.get_params()
        vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
        vectorizers.append({"params": {k: params[k] for k in TRANSFORM_PARAMS},
                            "vocabulary": vocabulary})
        arrays[f"idf_{i}"] = vectorizer.idf_
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, TFIDF_JSON), "w") as fh:
        json.dump({"vectorizers": vectorizers}, fh)
    np.savez(os.path.join(directory, TFIDF_ARRAYS), **arrays)


class SavedTfidf:
    """A pipeline written by `save_tfidf`, read back: `predict_proba` as the fitted one."""

    def __init__(self, directory: str):
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer

        with open(os.path.join(directory, TFIDF_JSON)) as fh:
            spec = json.load(fh)
        with np.load(os.path.join(directory, TFIDF_ARRAYS)) as arrays:
            self.coef, self.intercept = arrays["coef"], arrays["intercept"]
            self.classes_ = arrays["classes"]
            idfs = [arrays[f"idf_{i}"] for i in range(len(spec["vectorizers"]))]
        self.vectorizers = []
        for part, idf in zip(spec["vectorizers"], idfs, strict=True):
            params = dict(part["params"], ngram_range=tuple(part["params"]["ngram_range"]))
            vectorizer = TfidfVectorizer(vocabulary=part["vocabulary"], dtype=np.float32,
                                         **params)
            vectorizer.idf_ = idf
            self.vectorizers.append(vectorizer)

    def predict_proba(self, texts: Sequence[str]):
        import numpy as np
        import scipy.sparse as sp
        from scipy.special import expit, softmax

        features = sp.hstack([v.transform(list(texts)) for v in self.vectorizers]).tocsr()
        scores = np.asarray(features @ self.coef.T) + self.intercept
        if self.coef.shape[0] == 1:  # binary: one row of coefficients for the second class
            positive = expit(scores[:, 0])
            return np.stack([1.0 - positive, positive], axis=1)
        return softmax(scores, axis=1)
