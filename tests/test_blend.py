"""The model blended with its TF-IDF baseline: the saved TF-IDF model predicts what the fitted one
did, the weight is chosen on validation. A real run's blend, saved and applied by predict.py:
`assert_saved_blend_reproduces_the_run` (helpers.py), on test_warmstart.py's 2-rank ZeRO-3 run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorasweep.evaluation.baseline import SavedTfidf, fit_tfidf, save_tfidf
from lorasweep.evaluation.blend import (
    BLEND_JSON,
    WEIGHTS,
    SavedBlend,
    blend_probabilities,
    choose_weight,
    save_blend,
)
from lorasweep.outputs import BLEND_DIR

TEXTS = ["vendor: Acme Corp, memo: office chairs", "vendor: Globex, memo: cloud hosting",
         "vendor: Initech, memo: printer paper", "vendor: Acme Corp, memo: desk lamps",
         "vendor: Hooli, memo: server rental", "vendor: Initech, memo: toner cartridges"] * 3
UNSEEN = ["vendor: Umbrella, memo: office desks", "cloud", "", "zzz qqq"]


@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2] * 3, [0, 1, 1, 0, 1, 0] * 3],
                         ids=["three-classes", "two-classes"])
def test_the_saved_tfidf_model_predicts_what_the_fitted_one_does(labels, tmp_path):
    fitted = fit_tfidf(TEXTS, labels)
    save_tfidf(fitted, str(tmp_path))
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.joblib"))
    loaded = SavedTfidf(str(tmp_path))
    np.testing.assert_allclose(loaded.predict_proba(UNSEEN + TEXTS),
                               fitted.predict_proba(UNSEEN + TEXTS), rtol=1e-6, atol=1e-9)
    assert list(loaded.classes_) == list(fitted.classes_)


def test_the_ends_of_the_weight_are_the_two_models():
    rng = np.random.default_rng(0)
    model, tfidf = rng.dirichlet(np.ones(5), 50), rng.dirichlet(np.ones(5), 50)
    np.testing.assert_allclose(blend_probabilities(model, tfidf, 1.0), model, atol=1e-8)
    np.testing.assert_allclose(blend_probabilities(model, tfidf, 0.0), tfidf, atol=1e-8)
    mixed = blend_probabilities(model, tfidf, 0.4)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0)
    # a class the baseline gives probability 0 (never seen in train) stays finite and possible
    tfidf[:, 0] = 0.0
    assert np.isfinite(blend_probabilities(model, tfidf, 0.5)).all()


def confident(classes, rows_per_class, n, wrong_for, rng):
    """Probabilities sure of the right class, except for rows of `wrong_for` classes, where the
    next class gets a slight edge."""
    labels = np.repeat(np.arange(classes), rows_per_class)
    probs = rng.uniform(0.0, 0.02, (len(labels), n))
    for row, label in enumerate(labels):
        if label in wrong_for:
            probs[row, label], probs[row, (label + 1) % classes] = 0.40, 0.45
        else:
            probs[row, label] = 0.95
    return probs / probs.sum(axis=1, keepdims=True), labels


def test_the_weight_chosen_on_validation_beats_either_model_alone():
    """Each model is unsure where the other is sure: a weight strictly inside (0, 1) gets every
    row right, which neither end does."""
    rng = np.random.default_rng(1)
    model, labels = confident(4, 10, 4, wrong_for={2, 3}, rng=rng)
    tfidf, _ = confident(4, 10, 4, wrong_for={0, 1}, rng=rng)
    weight = choose_weight(model, tfidf, labels, "eval_f1_macro")
    assert 0.0 < weight < 1.0
    assert (blend_probabilities(model, tfidf, weight).argmax(1) == labels).all()
    assert (model.argmax(1) == labels).mean() == 0.5 and (tfidf.argmax(1) == labels).mean() == 0.5
    # the model alone is chosen when the baseline adds nothing (ties go to the model)
    assert choose_weight(model, model.copy(), labels, "eval_accuracy") == 1.0


def test_weights_that_tie_on_the_metric_go_to_the_blend_with_the_lower_log_loss():
    """Both models get every row right, the model barely and TF-IDF surely: every weight ties on
    macro-F1, and the blend whose probabilities fit the rows best is TF-IDF alone."""
    labels = np.arange(4).repeat(5)
    model = np.full((20, 4), 0.2)
    model[np.arange(20), labels] = 0.4
    tfidf = np.full((20, 4), 0.03)
    tfidf[np.arange(20), labels] = 0.91
    assert all((blend_probabilities(model, tfidf, w).argmax(1) == labels).all() for w in WEIGHTS)
    assert choose_weight(model, tfidf, labels, "eval_f1_macro") == 0.0
    assert choose_weight(tfidf, model, labels, "eval_f1_macro") == 1.0


def test_a_run_without_a_blend_removes_the_one_an_earlier_run_left(tmp_path):
    save_blend(str(tmp_path), fit_tfidf(TEXTS, [0, 1, 2] * 6), 0.3)
    assert json.loads((tmp_path / BLEND_DIR / BLEND_JSON).read_text()) == {"model_weight": 0.3}
    assert SavedBlend.exists(str(tmp_path))
    save_blend(str(tmp_path), None, None)
    assert not (tmp_path / BLEND_DIR).exists() and not SavedBlend.exists(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind

def test_a_tfidf_model_too_large_to_save_is_not_blended(monkeypatch, caplog):
    from lorasweep.evaluation import blend

    fitted = fit_tfidf(TEXTS, [0, 1, 2] * 6)
    assert fitted.steps[-1][1].coef_.dtype == np.float32  # what is scored is what is saved
    assert blend.blend_fits(fitted)
    monkeypatch.setattr(blend, "MAX_BLEND_BYTES", fitted.steps[-1][1].coef_.nbytes - 1)
    with caplog.at_level("INFO", logger="lorasweep.evaluation.blend"):
        assert not blend.blend_fits(fitted)
    assert "blend: skipped" in caplog.text
