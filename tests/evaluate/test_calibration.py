"""Calibration: Brier score, ECE, reliability curve, temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.calibration import (
    apply_temperature,
    brier_score,
    calibration_with_ci,
    expected_calibration_error,
    fit_temperature,
    probabilities_to_logits,
    reliability_curve,
)
from covidcxr.evaluate.metrics import MetricInputError


def _calibrated(n: int = 4000, seed: int = 0, scale: float = 2.0):
    """Logits z and labels drawn so that sigmoid(z) is the true probability."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n) * scale
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    return z, y


def test_brier_hand_computed_and_prevalence_forecast():
    assert brier_score([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    y = np.array([1] * 3 + [0] * 7)
    assert brier_score(y, np.full(10, 0.3)) == pytest.approx(0.3 * 0.7)


def test_ece_hand_computed_equal_width():
    # bins of width 0.5: [0.1, 0.3] -> mean p 0.2, 1 of 2 positive; [0.7, 0.9] -> 0.8, 1 of 2 positive
    ece = expected_calibration_error([0, 1, 1, 0], [0.1, 0.3, 0.7, 0.9], n_bins=2)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.2) + 0.5 * abs(0.5 - 0.8))


def test_ece_zero_when_bins_match_frequencies():
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p, n_bins=4) == pytest.approx(0.0)


def test_ece_small_for_calibrated_large_for_overconfident():
    z, y = _calibrated()
    assert expected_calibration_error(y, apply_temperature(z, 1.0)) < 0.03
    assert expected_calibration_error(y, apply_temperature(3 * z, 1.0)) > 0.08


def test_ece_quantile_bins_hold_equal_mass():
    z, y = _calibrated(n=1000)
    p = apply_temperature(z, 1.0)
    r = reliability_curve(y, p, n_bins=10, strategy="quantile")
    assert sum(r["count"]) == 1000
    assert max(r["count"]) - min(r["count"]) <= 2
    assert 0 <= expected_calibration_error(y, p, strategy="quantile") < 0.06


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_curve_matches_sklearn(strategy):
    z, y = _calibrated(n=500, seed=3)
    p = apply_temperature(2 * z, 1.0)
    r = reliability_curve(y, p, n_bins=8, strategy=strategy)
    true, pred = calibration_curve(y, p, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(r["prob_true"], true)
    np.testing.assert_allclose(r["prob_pred"], pred)
    assert len(r["count"]) == len(r["prob_true"]) and sum(r["count"]) == 500
    # the counts are those of the bins the curve averaged over: ECE from the curve equals the ECE
    ece_from_curve = np.sum(np.asarray(r["count"]) * np.abs(np.asarray(r["prob_true"]) - r["prob_pred"])) / 500
    assert ece_from_curve == pytest.approx(expected_calibration_error(y, p, n_bins=8, strategy=strategy))


def test_reliability_curve_leaves_empty_bins_out():
    r = reliability_curve([0, 1, 1], [0.05, 0.95, 0.92], n_bins=10)
    assert r["count"] == [1, 2]
    assert len(r["edges"]) == 11


@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_fit_temperature_recovers_the_scaling(factor):
    z, y = _calibrated(n=20000, seed=1)
    t = fit_temperature(factor * z, y)
    assert t == pytest.approx(factor, rel=0.08)
    # the fitted temperature lowers the ECE of the miscalibrated probabilities
    before = expected_calibration_error(y, apply_temperature(factor * z, 1.0))
    after = expected_calibration_error(y, apply_temperature(factor * z, t))
    assert after < before / 2


def test_fit_temperature_multiclass_softmax():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6000, 3)) * 2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert fit_temperature(2.5 * z, y) == pytest.approx(2.5, rel=0.1)
    probs = apply_temperature(2.5 * z, 2.5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs, p, atol=1e-12)


def test_temperature_keeps_the_order_so_the_auc():
    z, y = _calibrated(n=300, seed=4)
    assert np.array_equal(np.argsort(apply_temperature(z, 1.0)), np.argsort(apply_temperature(z, 4.0)))


def test_probabilities_to_logits_round_trip_and_clip():
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    z = probabilities_to_logits(p)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(apply_temperature(z, 1.0)[1:4], p[1:4])
    pm = np.array([[0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(apply_temperature(probabilities_to_logits(pm), 1.0), pm)


def test_calibration_with_ci_patient_bootstrap():
    z, y = _calibrated(n=400, seed=5)
    p = apply_temperature(3 * z, 1.0)
    patients = np.repeat(np.arange(200), 2)
    r = calibration_with_ci(y, p, patients, n_boot=200)
    assert r["n_images"] == 400 and r["n_patients"] == 200
    for name in ("brier", "ece"):
        assert r[name]["low"] <= r[name]["estimate"] <= r[name]["high"]
        assert r[name]["n_boot_valid"] == 200
    assert r["ece"]["estimate"] == pytest.approx(expected_calibration_error(y, p))
    assert r["brier"]["estimate"] == pytest.approx(brier_score(y, p))
    assert sum(r["curve"]["count"]) == 400


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: brier_score([0, 1], [0.2, 1.4]), "y_prob"),
        (lambda: brier_score([0, 2], [0.2, 0.4]), "y_true"),
        (lambda: brier_score([0, 1, 1], [0.2, 0.4]), "y_prob"),
        (lambda: expected_calibration_error([0, 1], [0.2, 0.4], n_bins=0), "n_bins"),
        (lambda: expected_calibration_error([0, 1], [0.2, 0.4], strategy="mass"), "strategy"),
        (lambda: fit_temperature([0.1, np.nan], [0, 1]), "logits"),
        (lambda: fit_temperature([0.1, 0.2], [0, 1, 1]), "y_true"),
        (lambda: fit_temperature(np.zeros((2, 3)), [0, 3]), "y_true"),
        (lambda: apply_temperature([0.1], 0.0), "temperature"),
        (lambda: probabilities_to_logits([0.1, -0.2]), "y_prob"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(MetricInputError) as err:
        call()
    assert isinstance(err.value, CovidCXRError)
    assert err.value.argument == argument
