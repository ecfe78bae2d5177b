"""evaluate-based metrics against scikit-learn on a fixed prediction set; reports and plots."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from lorasweep.evaluation.metrics import classification_metrics, hierarchy_metrics, per_class_report
from lorasweep.evaluation.reports import confusion_top_k, write_reports

Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 0, 3, 3]


def test_metrics_match_scikit_learn():
    got = classification_metrics(Y_PRED, Y_TRUE)
    assert got["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert got["f1_macro"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert got["f1_weighted"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert got["precision_macro"] == pytest.approx(precision_score(Y_TRUE, Y_PRED, average="macro"))
    assert got["recall_macro"] == pytest.approx(recall_score(Y_TRUE, Y_PRED, average="macro"))
    assert got["accuracy"] == pytest.approx(0.7)


def test_hierarchy_prefixes_roll_codes_up():
    labels = ["51100", "51200", "81100", "82100"]
    # true 51100 predicted 51200: wrong code, right group "51" and right class "5"
    got = hierarchy_metrics([1, 2], [0, 2], labels, [1, 2])
    assert got["prefix1_accuracy"] == 1.0 and got["prefix2_accuracy"] == 1.0
    got = hierarchy_metrics([3], [2], labels, [1, 2])
    assert got["prefix1_accuracy"] == 1.0 and got["prefix2_accuracy"] == 0.0


def test_per_class_report_and_plots(tmp_path):
    labels = ["a", "b", "c", "d", "dummy1"]
    rows = per_class_report(Y_PRED, Y_TRUE, labels)
    assert [r["label"] for r in rows] == ["a", "b", "c", "d"]  # unused slot left out
    assert rows[2]["support"] == 4 and rows[2]["recall"] == pytest.approx(0.5)
    paths = write_reports(str(tmp_path), Y_PRED, Y_TRUE, labels, top_k=2)
    assert json.loads(open(paths[1]).read())[0]["label"] == "a"
    for png in paths[2:]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_confusion_folds_rare_classes_into_other():
    matrix, names = confusion_top_k(Y_PRED, Y_TRUE, ["a", "b", "c", "d"], top_k=2)
    assert names == ["c", "a", "other"]
    assert matrix.sum() == len(Y_TRUE)
    assert matrix[1, 1] == 2 and matrix[0, 0] == 2  # a as a; c as c
    np.testing.assert_array_equal(matrix.sum(axis=1), [4, 3, 3])
