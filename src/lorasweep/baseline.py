"""The baseline every run is compared with: TF-IDF n-grams + logistic regression, same split.

Word 1-2-grams and character 3-5-grams (within word boundaries) over the serialized train rows,
a class-balanced multinomial logistic regression (C=10) on them (balanced: +0.07 test
macro-F1 on a 53-class long-tailed set, the same elsewhere), scored on validation and test with the same
metrics as the model. It is what a user writes in ten lines of scikit-learn; a fine-tuned model
that does not beat it has not earned its compute, and the run says so.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Dict, Optional, Sequence, Tuple

from lorasweep.metrics import classification_metrics

log = logging.getLogger(__name__)

# Above this many train rows the baseline is skipped (with a log line): its cost grows with the
# vocabulary of n-grams, and at that size a user has no doubt that fitting it is slow.
MAX_TRAIN_ROWS = 200_000
MAX_ITER = 300  # lbfgs iterations: bounds the solver's time; the warning at the cap is expected


def build_tfidf_classifier():
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, dtype=np.float32),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2,
                        dtype=np.float32))
    return make_pipeline(features, LogisticRegression(C=10.0, max_iter=MAX_ITER,
                                                       class_weight="balanced"))


def tfidf_baseline(train: Tuple[Sequence[str], Sequence[int]],
                   scored: Dict[str, Tuple[Sequence[str], Sequence[int]]]
                   ) -> Optional[Dict[str, float]]:
    """Fit on `train` (texts, label ids); return `<prefix>_baseline_<metric>` for each scored
    split (`{"eval": (texts, ids), "test": ...}`) and `baseline_seconds`."""
    texts, labels = train
    if len(texts) > MAX_TRAIN_ROWS:
        log.info("baseline: skipped (%d train rows > %d); set baseline=none to silence this",
                 len(texts), MAX_TRAIN_ROWS)
        return None
    if len(set(labels)) < 2:
        return None
    started = time.perf_counter()
    model = build_tfidf_classifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(lbfgs|max_iter|ITERATIONS).*")
        model.fit(list(texts), list(labels))
    metrics: Dict[str, float] = {}
    for prefix, (split_texts, split_labels) in scored.items():
        predictions = model.predict(list(split_texts))
        for name, value in classification_metrics(predictions, split_labels).items():
            metrics[f"{prefix}_baseline_{name}"] = value
    metrics["baseline_seconds"] = time.perf_counter() - started
    log.info("baseline: TF-IDF + logistic regression, eval macro-F1 %.4f (%.1f s)",
             metrics.get("eval_baseline_f1_macro", float("nan")), metrics["baseline_seconds"])
    return metrics
