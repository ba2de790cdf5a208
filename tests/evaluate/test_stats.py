"""DeLong's test (fast midrank algorithm) and McNemar's test."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from covidcxr.evaluate import (
    MetricInputError,
    delong_test,
    delong_test_independent,
    delong_variance,
    mcnemar_test,
)


def _example(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = rng.normal(size=n) + 1.5 * y
    b = 0.6 * a + rng.normal(size=n) * 0.8 + 0.2 * y  # correlated with a, weaker
    return y, a, b


# ------------------------------------------------------------------ DeLong


def test_delong_aucs_equal_sklearn_including_ties():
    y, a, b = _example()
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b))
    ties = np.round(a, 0)
    auc, _ = delong_variance(y, ties)
    assert auc == pytest.approx(roc_auc_score(y, ties))


def test_delong_variance_matches_bootstrap():
    y, a, _ = _example(n=200, seed=4)
    _, var = delong_variance(y, a)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, y.size, size=(2000, y.size))
    boot = np.array([roc_auc_score(y[i], a[i]) for i in idx if 0 < y[i].sum() < y.size])
    assert var == pytest.approx(boot.var(ddof=1), rel=0.15)


def test_delong_variance_hand_example():
    # Positives X = (0.4, 0.9), negatives Y = (0.1, 0.6): psi(X,Y) = [[1, 0], [1, 1]].
    # V10 = (0.5, 1.0), V01 = (1.0, 0.5); S10 = S01 = 0.125; var = 0.125/2 + 0.125/2.
    auc, var = delong_variance([0, 1, 0, 1], [0.1, 0.4, 0.6, 0.9])
    assert auc == pytest.approx(0.75)
    assert var == pytest.approx(0.125)


def test_delong_self_comparison_is_null():
    y, a, _ = _example()
    r = delong_test(y, a, a)
    assert r["z"] == 0.0 and r["p_value"] == 1.0 and r["auc_diff"] == 0.0
    assert r["covariance"] == pytest.approx(r["var_a"])


def test_delong_detects_better_score_and_is_symmetric():
    y, a, b = _example(n=400, seed=1)
    r = delong_test(y, a, b)
    assert r["auc_a"] > r["auc_b"]
    assert r["p_value"] < 0.05 and r["z"] > 0
    q = delong_test(y, b, a)
    assert q["p_value"] == pytest.approx(r["p_value"])
    assert q["z"] == pytest.approx(-r["z"])
    assert q["auc_diff"] == pytest.approx(-r["auc_diff"])
    assert q["covariance"] == pytest.approx(r["covariance"])
    assert 0 < r["covariance"] < np.sqrt(r["var_a"] * r["var_b"])  # correlated scores


def test_delong_no_difference_gives_large_p():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    a = rng.normal(size=300) + y
    b = rng.normal(size=300) + y
    assert delong_test(y, a, b)["p_value"] > 0.01


def test_delong_independent():
    y1, a, _ = _example(n=300, seed=2)
    rng = np.random.default_rng(3)
    y2 = rng.integers(0, 2, 250)
    b = rng.normal(size=250) + 0.4 * y2  # a much weaker classifier on another test set
    r = delong_test_independent(y1, a, y2, b)
    _, va = delong_variance(y1, a)
    _, vb = delong_variance(y2, b)
    assert r["var_a"] == pytest.approx(va) and r["var_b"] == pytest.approx(vb)
    assert r["z"] == pytest.approx((r["auc_a"] - r["auc_b"]) / np.sqrt(va + vb))
    assert r["p_value"] < 0.05
    same = delong_test_independent(y1, a, y1, a)
    assert same["z"] == 0.0 and same["p_value"] == 1.0


def test_delong_errors_name_argument():
    with pytest.raises(MetricInputError, match="score_b.*expected 4"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2])
    with pytest.raises(MetricInputError, match="y_true.*at least 2 positive"):
        delong_variance([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(MetricInputError, match="score_a.*finite"):
        delong_test([0, 1, 0, 1], [0.1, np.inf, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(MetricInputError, match="y_true_b"):
        delong_test_independent([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0, 3, 0, 1], [0.1, 0.2, 0.3, 0.4])


# ------------------------------------------------------------------ McNemar


def _paired(b: int, c: int, both_right: int = 50, both_wrong: int = 7):
    """Decisions giving exactly the table [[both_right, b], [c, both_wrong]] of correctness."""
    n = both_right + b + c + both_wrong
    y = np.ones(n, dtype=int)
    right_a = np.r_[np.ones(both_right), np.ones(b), np.zeros(c), np.zeros(both_wrong)].astype(bool)
    right_b = np.r_[np.ones(both_right), np.zeros(b), np.ones(c), np.zeros(both_wrong)].astype(bool)
    return y, np.where(right_a, 1, 0), np.where(right_b, 1, 0)


def test_mcnemar_counts_and_exact_form():
    y, pa, pb = _paired(b=9, c=2)
    r = mcnemar_test(y, pa, pb)
    assert (r["b"], r["c"], r["exact"]) == (9, 2, True)
    ref = sm_mcnemar([[50, 9], [2, 7]], exact=True)
    assert r["p_value"] == pytest.approx(ref.pvalue)
    assert r["statistic"] == pytest.approx(ref.statistic)


def test_mcnemar_chi_square_form():
    y, pa, pb = _paired(b=30, c=12)
    r = mcnemar_test(y, pa, pb)
    assert (r["b"], r["c"], r["exact"]) == (30, 12, False)
    ref = sm_mcnemar([[50, 30], [12, 7]], exact=False, correction=True)
    assert r["statistic"] == pytest.approx(ref.statistic)
    assert r["statistic"] == pytest.approx((abs(30 - 12) - 1) ** 2 / 42)
    assert r["p_value"] == pytest.approx(ref.pvalue)
    forced = mcnemar_test(y, pa, pb, exact=True)
    assert forced["exact"] is True
    assert forced["p_value"] == pytest.approx(sm_mcnemar([[50, 30], [12, 7]], exact=True).pvalue)


def test_mcnemar_multiclass_labels_and_no_discordance():
    y = np.array([0, 1, 2, 2, 1])
    r = mcnemar_test(y, [0, 1, 2, 0, 1], [0, 2, 2, 2, 1])
    assert (r["b"], r["c"]) == (1, 1)
    same = mcnemar_test(y, y, y)
    assert same["p_value"] == 1.0 and same["b"] == same["c"] == 0
    assert mcnemar_test(y, y, y, exact=False)["p_value"] == 1.0


def test_mcnemar_errors():
    with pytest.raises(MetricInputError, match="pred_b.*expected 3"):
        mcnemar_test([0, 1, 1], [0, 1, 1], [0, 1])
    with pytest.raises(MetricInputError, match="exact"):
        mcnemar_test([0, 1], [0, 1], [0, 1], exact="yes")


def test_clustered_paired_difference_counts_a_patients_copies_once():
    """`obuchowski_test`: DeLong's paired variance with one image per patient; a patient's second
    identical image adds no evidence, so the clustered variance stays while DeLong's halves."""
    from covidcxr.evaluate.stats import delong_test, obuchowski_test
    from covidcxr.experiments.table import paired_auc_difference

    rng = np.random.default_rng(4)
    y = np.repeat([1, 0], 80)
    a = 1.0 * y + rng.normal(size=y.size)
    b = 0.6 * y + 0.6 * a + rng.normal(size=y.size)
    patients = np.arange(y.size).astype(str)
    one = obuchowski_test(y, a, b, patients)
    delong = delong_test(y, a, b)
    assert one["auc_diff"] == pytest.approx(delong["auc_diff"])
    assert one["variance"] == pytest.approx(delong["var_a"] + delong["var_b"] - 2 * delong["covariance"], rel=1e-9)
    twice = obuchowski_test(np.tile(y, 2), np.tile(a, 2), np.tile(b, 2), np.tile(patients, 2))
    assert twice["auc_diff"] == pytest.approx(one["auc_diff"])
    assert twice["variance"] == pytest.approx(one["variance"], rel=0.02)  # the copies are not new patients
    assert twice["variance_independent"] == pytest.approx(one["variance"] / 2, rel=0.05)  # DeLong counts them
    clustered = paired_auc_difference(np.tile(y, 2), np.tile(a, 2), np.tile(b, 2), np.tile(patients, 2))
    naive = paired_auc_difference(np.tile(y, 2), np.tile(a, 2), np.tile(b, 2))
    assert clustered["ci_method"] == "obuchowski_clustered" and naive["ci_method"] == "delong"
    assert clustered["delta_high"] - clustered["delta_low"] == pytest.approx(np.sqrt(2) * (naive["delta_high"] - naive["delta_low"]), rel=0.05)
