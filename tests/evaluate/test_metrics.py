"""Metrics, thresholds, multi-class accuracies and the patient-level bootstrap."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate import (
    MetricInputError,
    binary_metrics,
    binary_metrics_with_ci,
    bootstrap_ci,
    confusion_counts,
    metrics_from_counts,
    three_class_accuracy,
    threshold_at_sensitivity,
    two_class_accuracy,
    youden_threshold,
)


def _scores(n: int = 400, seed: int = 0, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + shift * y
    return y, s


# ------------------------------------------------------------------ published tables


@pytest.mark.parametrize(
    ("counts", "sens", "spec"),
    [
        (dict(tp=208, fp=15, tn=1189, fn=16), 92.86, 98.75),  # Apostolopoulos 2020 Table 4, VGG19
        (dict(tp=222, fp=35, tn=1169, fn=2), 99.11, 97.09),  # MobileNet v2
    ],
)
def test_apostolopoulos_table4(counts, sens, spec):
    m = metrics_from_counts(**counts)
    assert round(100 * m["sensitivity"], 2) == pytest.approx(sens)
    assert round(100 * m["specificity"], 2) == pytest.approx(spec)
    assert m["n"] == 1428
    assert m["sensitivity"] == counts["tp"] / (counts["tp"] + counts["fn"])


def test_mobilenet_sensitivity_matches_paper_two_decimals_truncated():
    # The paper prints 99.10 %: 222/224 = 99.107 %, i.e. truncated rather than rounded.
    m = metrics_from_counts(tp=222, fp=35, tn=1169, fn=2)
    assert math.floor(10000 * m["sensitivity"]) / 100 == pytest.approx(99.10)


def test_dor_known_table():
    m = metrics_from_counts(tp=20, fp=5, tn=15, fn=10)
    assert m["dor"] == pytest.approx(6.0)
    assert m["dor_corrected"] is False
    assert m["ppv"] == pytest.approx(0.8)
    assert m["npv"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(40 / 55)
    assert m["accuracy"] == pytest.approx(35 / 50)
    assert m["balanced_accuracy"] == pytest.approx((20 / 30 + 15 / 20) / 2)


def test_dor_zero_cell_haldane_anscombe():
    m = metrics_from_counts(tp=20, fp=0, tn=15, fn=10)
    assert m["dor_corrected"] is True
    assert m["dor"] == pytest.approx((20.5 * 15.5) / (0.5 * 10.5))
    assert m["ppv"] == 1.0


def test_undefined_ratios_are_nan_not_errors():
    m = metrics_from_counts(tp=0, fp=0, tn=10, fn=0)  # no positives at all
    assert math.isnan(m["sensitivity"]) and math.isnan(m["ppv"]) and math.isnan(m["dor"])
    assert m["specificity"] == 1.0
    assert math.isnan(m["f1"])
    m = metrics_from_counts(0, 0, 0, 0)
    assert math.isnan(m["accuracy"])


# ------------------------------------------------------------------ binary metrics


def test_confusion_counts():
    assert confusion_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}


def test_binary_metrics_matches_sklearn_and_counts():
    y, s = _scores()
    m = binary_metrics(y, s, threshold=0.3)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    pred = s >= 0.3
    assert m["tp"] == int(np.sum(pred & (y == 1)))
    assert m["fn"] == int(np.sum(~pred & (y == 1)))
    assert m["n"] == y.size and m["threshold"] == 0.3
    assert m["sensitivity"] == pytest.approx(m["tp"] / (m["tp"] + m["fn"]))
    expected = {"auc", "sensitivity", "specificity", "balanced_accuracy", "dor", "dor_corrected", "accuracy",
                "f1", "ppv", "npv", "tp", "fp", "tn", "fn", "threshold", "n"}
    assert set(m) == expected


def test_binary_metrics_threshold_is_inclusive():
    m = binary_metrics([0, 1], [0.2, 0.5], threshold=0.5)
    assert m["tp"] == 1 and m["fp"] == 0


# ------------------------------------------------------------------ thresholds


def test_youden_threshold_maximises_j():
    y, s = _scores(seed=1)
    t = youden_threshold(y, s)

    def j(thr):
        pred = s >= thr
        return pred[y == 1].mean() + (~pred[y == 0]).mean() - 1

    best = max(j(v) for v in np.unique(s))
    assert j(t) == pytest.approx(best)
    assert t in set(s.tolist())


def test_threshold_at_sensitivity():
    y, s = _scores(seed=2)
    t = threshold_at_sensitivity(y, s, sensitivity=0.9)
    m = binary_metrics(y, s, t)
    assert m["sensitivity"] >= 0.9
    higher = s[s > t]
    if higher.size:  # the next observed score up misses the target
        assert binary_metrics(y, s, higher.min())["sensitivity"] < 0.9
    assert threshold_at_sensitivity([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.8], sensitivity=1.0) == 0.2


# ------------------------------------------------------------------ multi-class


def test_multiclass_accuracies_from_matrix_and_labels():
    cm = np.array([[8, 1, 1], [0, 9, 1], [2, 0, 8]])
    assert three_class_accuracy(confusion=cm) == pytest.approx(25 / 30)
    # COVID = class 0: correct = 8 + (9 + 1 + 0 + 8) = 26
    assert two_class_accuracy(confusion=cm, covid_class=0) == pytest.approx(26 / 30)
    y = np.repeat(np.arange(3), cm.sum(axis=1))
    p = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
    assert three_class_accuracy(y, p) == pytest.approx(25 / 30)
    assert two_class_accuracy(y, p, covid_class=0) == pytest.approx(26 / 30)
    assert two_class_accuracy(y, p, covid_class=2) == pytest.approx((8 + 8 + 1 + 0 + 9) / 30)


def test_multiclass_errors():
    with pytest.raises(MetricInputError, match="confusion"):
        three_class_accuracy(confusion=np.eye(2))
    with pytest.raises(MetricInputError, match="covid_class"):
        two_class_accuracy(confusion=np.eye(3), covid_class=3)
    with pytest.raises(MetricInputError, match="y_pred"):
        three_class_accuracy([0, 1, 2], [0, 1])


# ------------------------------------------------------------------ patient bootstrap


def _patients(n_patients: int = 120, per: int = 5, seed: int = 3):
    """Each patient's single image repeated ``per`` times."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    s = rng.normal(size=n_patients) + 1.0 * y
    pid = np.repeat(np.arange(n_patients), per)
    return np.repeat(y, per), np.repeat(s, per), pid


def test_patient_bootstrap_wider_than_image_bootstrap():
    y, s, pid = _patients()
    patient = bootstrap_ci(y, s, pid, roc_auc_score, n_boot=300, seed=0)
    naive = bootstrap_ci(y, s, np.arange(y.size), roc_auc_score, n_boot=300, seed=0)
    assert patient["n_patients"] == 120 and patient["n_images"] == 600
    assert naive["n_patients"] == 600
    assert patient["estimate"] == pytest.approx(roc_auc_score(y, s))
    width_p = patient["high"] - patient["low"]
    width_n = naive["high"] - naive["low"]
    assert width_p > 1.5 * width_n  # ~sqrt(5) wider in expectation
    assert patient["low"] < patient["estimate"] < patient["high"]


def test_bootstrap_seeded_and_skips_undefined():
    y, s, pid = _patients(n_patients=6, per=2)
    a = bootstrap_ci(y, s, pid, roc_auc_score, n_boot=200, seed=7)
    b = bootstrap_ci(y, s, pid, roc_auc_score, n_boot=200, seed=7)
    assert a == b
    assert 0 < a["n_boot_valid"] < 200  # with 6 patients some resamples hold one class only


def test_binary_metrics_with_ci_fast_and_agrees_with_patient_bootstrap_away_from_bounds():
    y, s, pid = _patients(n_patients=400, per=5)
    t0 = time.perf_counter()
    r = binary_metrics_with_ci(y, s, pid, threshold=0.5, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 3.0
    assert r["n_images"] == 2000 and r["n_patients"] == 400
    point = binary_metrics(y, s, 0.5)
    for name in ("auc", "sensitivity", "specificity", "dor", "f1"):
        assert r[name]["estimate"] == pytest.approx(point[name])
        assert r[name]["low"] <= r[name]["estimate"] <= r[name]["high"]
        assert r[name]["method"]
    # Each patient's image is repeated 5 times: the design effect is 5, the information that of 400 images.
    assert r["sensitivity"]["design_effect"] == pytest.approx(5.0)
    # Far from 0 and 1, with 400 patients, the analytic AUC interval and the patient bootstrap agree.
    loop = bootstrap_ci(y, s, pid, roc_auc_score, n_boot=1000, seed=1)
    assert r["auc"]["low"] == pytest.approx(loop["low"], abs=0.015)
    assert r["auc"]["high"] == pytest.approx(loop["high"], abs=0.015)
    assert binary_metrics_with_ci(y, s, pid, n_boot=50, seed=3) == binary_metrics_with_ci(y, s, pid, n_boot=50, seed=3)


def test_weighted_auc_equals_sklearn_on_resample_with_ties():
    from covidcxr.evaluate.metrics import _weighted_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    idx = rng.integers(0, 300, 300)
    w = np.bincount(idx, minlength=300).astype(float)[None, :]
    assert _weighted_auc(y, s, w)[0] == pytest.approx(roc_auc_score(y[idx], s[idx]))


# ------------------------------------------------------------------ bad input


def test_errors_name_the_argument():
    with pytest.raises(MetricInputError, match="y_score.*expected 3 elements"):
        binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(MetricInputError, match="y_true.*0/1.*2"):
        binary_metrics([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(MetricInputError, match="y_score.*finite"):
        binary_metrics([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(MetricInputError, match="y_true.*positive.*negative"):
        binary_metrics([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricInputError, match="tp.*non-negative"):
        metrics_from_counts(-1, 0, 0, 0)
    with pytest.raises(MetricInputError, match="groups.*expected 3"):
        bootstrap_ci([0, 1, 1], [0.1, 0.2, 0.3], ["a", "b"], roc_auc_score)
    with pytest.raises(MetricInputError, match="patient_ids"):
        binary_metrics_with_ci([0, 1, 1], [0.1, 0.2, 0.3], ["a"])
    with pytest.raises(MetricInputError, match="n_boot"):
        bootstrap_ci([0, 1], [0.1, 0.2], ["a", "b"], roc_auc_score, n_boot=0)
    with pytest.raises(MetricInputError, match="sensitivity"):
        threshold_at_sensitivity([0, 1], [0.1, 0.2], sensitivity=1.5)
    err = MetricInputError("y_true", "x")
    assert isinstance(err, CovidCXRError) and isinstance(err, ValueError) and err.argument == "y_true"
