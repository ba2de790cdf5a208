"""Sensitivity at a fixed specificity and the precision-recall curve: the vectorised patient
bootstrap gives exactly the interval of a loop of scikit-learn calls on the same resamples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from covidcxr.evaluate.calibration import brier_score, calibration_with_ci, expected_calibration_error
from covidcxr.evaluate.curves import precision_recall, sensitivity_at_specificity
from covidcxr.evaluate.metrics import MetricInputError, bootstrap_ci


def _data(n_patients: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), 2)
    y = np.repeat(rng.integers(0, 2, n_patients), 2)
    s = 1 / (1 + np.exp(-np.round(rng.normal(size=y.size) + 1.2 * y, 1)))  # rounded: ties between scores
    return y, s, patients


def _sens_at(target):
    def fn(y, s):
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        return float(tpr[fpr <= 1 - target + 1e-12].max())
    return fn


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_at_specificity_matches_the_loop(target):
    y, s, g = _data()
    r = sensitivity_at_specificity(y, s, g, target, n_boot=200)
    ref = bootstrap_ci(y, s, g, _sens_at(target), n_boot=200)
    assert r["sensitivity"]["estimate"] == pytest.approx(ref["estimate"])
    assert (r["sensitivity"]["low"], r["sensitivity"]["high"]) == pytest.approx((ref["low"], ref["high"]))
    assert r["specificity_achieved"] >= target
    assert np.mean(s[y == 0] >= r["threshold"]) == pytest.approx(1 - r["specificity_achieved"])
    assert np.mean(s[y == 1] >= r["threshold"]) == pytest.approx(r["sensitivity"]["estimate"])
    assert r["n_patients"] == 60 and r["n_images"] == 120


def test_average_precision_matches_sklearn_and_the_loop():
    y, s, g = _data(seed=1)
    r = precision_recall(y, s, g, n_boot=200)
    ref = bootstrap_ci(y, s, g, average_precision_score, n_boot=200)
    assert r["average_precision"]["estimate"] == pytest.approx(average_precision_score(y, s))
    assert (r["average_precision"]["low"], r["average_precision"]["high"]) == pytest.approx((ref["low"], ref["high"]))
    precision, recall, _ = precision_recall_curve(y, s)
    np.testing.assert_allclose(r["precision"], precision)
    np.testing.assert_allclose(r["recall"], recall)
    assert r["prevalence"] == pytest.approx(y.mean())


def test_calibration_intervals_match_the_loop():
    y, s, g = _data(seed=2)
    r = calibration_with_ci(y, s, g, n_boot=200)
    for name, fn in (("ece", expected_calibration_error), ("brier", brier_score)):
        ref = bootstrap_ci(y, s, g, fn, n_boot=200)
        assert (r[name]["low"], r[name]["high"]) == pytest.approx((ref["low"], ref["high"]))


def test_perfect_scores_and_unreachable_targets():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    r = sensitivity_at_specificity(y, s, np.arange(6), 0.95, n_boot=50)
    assert r["sensitivity"]["estimate"] == 1.0 and r["specificity_achieved"] == 1.0
    inverted = sensitivity_at_specificity(y, 1 - s, np.arange(6), 0.95, n_boot=50)
    assert inverted["sensitivity"]["estimate"] == 0.0
    assert precision_recall(y, s, np.arange(6), n_boot=50)["average_precision"]["estimate"] == 1.0


def test_long_curves_are_thinned():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 3000), rng.random(3000)
    r = precision_recall(y, s, np.arange(3000), n_boot=20, max_points=100)
    assert len(r["precision"]) <= 100 and r["recall"][0] == 1.0 and r["recall"][-1] == 0.0


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: sensitivity_at_specificity([0, 1], [0.2, 0.4], [1, 2], 1.0), "specificity"),
        (lambda: sensitivity_at_specificity([1, 1], [0.2, 0.4], [1, 2], 0.9), "y_true"),
        (lambda: precision_recall([0, 0], [0.2, 0.4], [1, 2]), "y_true"),
        (lambda: precision_recall([0, 1], [0.2, 0.4], [1, 2, 3]), "patient_ids"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(MetricInputError) as err:
        call()
    assert err.value.argument == argument
