"""Statistical tests comparing classifiers: DeLong's test for AUCs, McNemar's test for decisions.

* :func:`delong_test` — DeLong, DeLong & Clarke-Pearson (1988), two correlated AUCs
  measured on the same cases, computed with the fast midrank algorithm of Sun & Xu
  (2014, IEEE Signal Processing Letters 21:1389). No maintained Python library
  provides it (scikit-learn, SciPy and statsmodels do not), so it is written by hand
  here and checked against scikit-learn's AUC and a bootstrap variance in the tests.
* :func:`delong_test_independent` — two AUCs on two independent test sets.
* :func:`obuchowski_variance` — the AUC's variance when a patient contributes several
  images (Obuchowski 1997, Biometrics 53:567), the clustered form of DeLong's variance;
  the AUC interval of :func:`covidcxr.evaluate.metrics.auc_ci` takes its design effects
  from it. Hand-written for the same reason as DeLong's.
* :func:`obuchowski_test` — two correlated AUCs on the same clustered images: the paired
  difference with Obuchowski's variance (what the leave-one-source-out baseline table uses).
* :func:`mcnemar_test` — paired correctness of two classifiers' decisions
  (statsmodels underneath).

Example::

    >>> import numpy as np
    >>> from covidcxr.evaluate.stats import delong_test
    >>> y = np.array([0, 0, 0, 1, 1, 1])
    >>> r = delong_test(y, [0.1, 0.4, 0.35, 0.8, 0.7, 0.9], [0.2, 0.6, 0.1, 0.5, 0.3, 0.9])
    >>> round(r["auc_a"], 3), round(r["auc_b"], 3)
    (1.0, 0.778)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar

from covidcxr.evaluate.metrics import MetricInputError, _as_1d, _both_classes, _check_length, _labels, _scores

__all__ = ["delong_test", "delong_test_independent", "delong_variance", "mcnemar_test", "obuchowski_test", "obuchowski_variance"]


def _fast_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their covariance matrix for K score rows on the same cases (Sun & Xu 2014).

    Args:
        y: (N,) labels 0/1 with at least 2 of each class.
        scores: (K, N) scores.

    Returns:
        ``aucs`` (K,) and ``cov`` (K, K), the DeLong covariance estimate.
    """
    pos = y == 1
    x = scores[:, pos]  # (K, m) positives
    z = scores[:, ~pos]  # (K, n) negatives
    m, n = x.shape[1], z.shape[1]
    # Midranks (average ranks over ties) within positives, within negatives, and overall.
    tx = rankdata(x, axis=1)
    ty = rankdata(z, axis=1)
    tz = rankdata(np.concatenate([x, z], axis=1), axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # structural components of the negatives
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement values (DeLong's structural components) of one score row, ties counted 1/2.

    Returns:
        ``v10`` (m,): for each positive, the fraction of negatives scored below it;
        ``v01`` (n,): for each negative, the fraction of positives scored above it.
    """
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    overall = rankdata(s)
    v10 = (overall[pos] - rankdata(s[pos])) / n
    v01 = 1.0 - (overall[~pos] - rankdata(s[~pos])) / m
    return v10, v01


def obuchowski_variance(y_true: Any, score: Any, groups: Any) -> dict[str, float]:
    """AUC and its variance when images are clustered in patients (Obuchowski 1997).

    With ``V10_i`` (``V01_i``) the sum of the placement values of patient i's positive
    (negative) images, ``m_i``/``n_i`` their numbers, ``M``/``N`` the totals and
    ``I10``/``I01``/``I`` the numbers of patients with positive / negative / any images
    (Obuchowski NA, "Nonparametric analysis of clustered ROC curve data", Biometrics
    1997; 53:567-578, eqs. 3-5)::

        S10 = I10 / ((I10 - 1) M) * sum_i (V10_i - m_i AUC)^2
        S01 = I01 / ((I01 - 1) N) * sum_i (V01_i - n_i AUC)^2
        S11 = I / (I - 1) * sum_i (V10_i - m_i AUC)(V01_i - n_i AUC)
        var(AUC) = S10 / M + S01 / N + 2 S11 / (M N)

    With one image per patient it is DeLong's variance (up to the n/(n-1) factor). The
    design effects compare each class's clustered variance with the one that treats its
    images as independent (``s10 = var(V10_j)``): ``design_effect_positive = S10 / s10``
    (NaN when undefined: one patient in the class, or every placement equal, e.g. AUC 1).

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        score: (N,) finite scores.
        groups: (N,) patient id of each image.

    Returns:
        ``auc, variance, variance_independent`` (DeLong's, images independent),
        ``s10, s01, s11, design_effect_positive, design_effect_negative,
        n_positive, n_negative, n_patients_positive, n_patients_negative``.

    Example::

        >>> r = obuchowski_variance([0, 0, 1, 1, 1, 0], [0.1, 0.3, 0.8, 0.7, 0.2, 0.4], ["a", "a", "b", "b", "c", "c"])
        >>> round(r["auc"], 3)
        0.778
    """
    y = _labels(y_true, "y_true")
    s = _scores(score, "score", y.size)
    _both_classes(y)
    cluster = _clusters(groups, y.size)
    v10, v01 = _placements(y, s)
    m, n = v10.size, v01.size
    auc = float(v10.mean())
    s10, s01, s11, variance, i10, i01 = _clustered(y == 1, cluster, v10, v01, auc)
    var_x = float(np.var(v10, ddof=1)) if m > 1 else math.nan
    var_y = float(np.var(v01, ddof=1)) if n > 1 else math.nan

    def ratio(a: float, b: float) -> float:
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 1e-15 else math.nan

    return {
        "auc": auc,
        "variance": variance,
        "variance_independent": var_x / m + var_y / n,
        "s10": s10,
        "s01": s01,
        "s11": s11,
        "design_effect_positive": ratio(s10, var_x),
        "design_effect_negative": ratio(s01, var_y),
        "n_positive": m,
        "n_negative": n,
        "n_patients_positive": i10,
        "n_patients_negative": i01,
    }


def _clusters(groups: Any, n: int) -> np.ndarray:
    g = _as_1d(groups, "groups")
    _check_length(g, "groups", n, "y_true")
    _, cluster = np.unique(g.astype(str), return_inverse=True)
    return cluster.reshape(-1)


def _clustered(pos: np.ndarray, cluster: np.ndarray, v10: np.ndarray, v01: np.ndarray, theta: float) -> tuple[float, float, float, float, int, int]:
    """Obuchowski's (1997) S10, S01, S11 and variance of ``theta = mean(v10)`` from per-image structural components."""
    k = int(cluster.max()) + 1
    m, n = v10.size, v01.size
    m_i = np.bincount(cluster[pos], minlength=k).astype(np.float64)
    n_i = np.bincount(cluster[~pos], minlength=k).astype(np.float64)
    d10 = np.bincount(cluster[pos], weights=v10, minlength=k) - m_i * theta
    d01 = np.bincount(cluster[~pos], weights=v01, minlength=k) - n_i * theta
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    s10 = i10 / ((i10 - 1) * m) * float(np.sum(d10**2)) if i10 > 1 else math.nan
    s01 = i01 / ((i01 - 1) * n) * float(np.sum(d01**2)) if i01 > 1 else math.nan
    s11 = k / (k - 1) * float(np.sum(d10 * d01)) if k > 1 else math.nan
    return s10, s01, s11, s10 / m + s01 / n + 2.0 * s11 / (m * n), i10, i01


def obuchowski_test(y_true: Any, score_a: Any, score_b: Any, groups: Any) -> dict[str, float]:
    """Two correlated AUCs on the same images clustered in patients: DeLong's paired test with Obuchowski's variance.

    ``AUC_a − AUC_b`` is the mean of the differences of the two scores' placement values
    (DeLong's structural components), so its variance under clustering is Obuchowski's
    formula (`obuchowski_variance`, Biometrics 1997; 53:567-578) applied to those
    differences: the same patient sums, of ``V10_a − V10_b`` and ``V01_a − V01_b``. With
    one image per patient it is DeLong's paired variance (`delong_test`) up to the
    n/(n−1) factors. Coverage of the resulting interval is measured in
    ``benchmarks/bench_coverage.py`` (``coverage.paired_auc_difference``).

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        score_a, score_b: (N,) finite scores of the two classifiers on the same images.
        groups: (N,) patient id of each image.

    Returns:
        ``auc_a, auc_b, auc_diff (a − b), variance, variance_independent`` (DeLong's), ``z, p_value``,
        ``n_images, n_patients``.

    Example::

        >>> r = obuchowski_test([0, 0, 1, 1, 1, 0], [0.1, 0.3, 0.8, 0.7, 0.2, 0.4], [0.2, 0.1, 0.6, 0.9, 0.3, 0.5], ["a", "a", "b", "b", "c", "c"])
        >>> round(r["auc_diff"], 3)
        -0.111
    """
    y = _labels(y_true, "y_true")
    a = _scores(score_a, "score_a", y.size)
    b = _scores(score_b, "score_b", y.size)
    _both_classes(y)
    cluster = _clusters(groups, y.size)
    a10, a01 = _placements(y, a)
    b10, b01 = _placements(y, b)
    diff = float(a10.mean() - b10.mean())
    *_, variance, _, _ = _clustered(y == 1, cluster, a10 - b10, a01 - b01, diff)
    independent = delong_test(y, a, b)
    z, p = _two_sided(diff, variance if math.isfinite(variance) else 0.0)
    return {
        "auc_a": float(a10.mean()),
        "auc_b": float(b10.mean()),
        "auc_diff": diff,
        "variance": variance,
        "variance_independent": independent["var_a"] + independent["var_b"] - 2.0 * independent["covariance"],
        "z": z,
        "p_value": p,
        "n_images": int(y.size),
        "n_patients": int(cluster.max()) + 1,
    }


def _prepare(y_true: Any, scores: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true, "y_true")
    rows = [_scores(v, name, y.size) for name, v in scores.items()]
    _both_classes(y, minimum=2, why="the DeLong variance")
    return y, np.vstack(rows)


def delong_variance(y_true: Any, score: Any) -> tuple[float, float]:
    """AUC and its DeLong variance.

    Args:
        y_true: (N,) labels 0/1 with at least two cases of each class.
        score: (N,) finite scores.

    Returns:
        ``(auc, variance)``.

    Example::

        >>> auc, var = delong_variance([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
        >>> auc
        0.75
    """
    y, s = _prepare(y_true, {"score": score})
    aucs, cov = _fast_delong(y, s)
    return float(aucs[0]), float(cov[0, 0])


def _two_sided(diff: float, var: float) -> tuple[float, float]:
    """z and two-sided normal p of ``diff`` with variance ``var``; 0/0 -> (0, 1)."""
    var = max(var, 0.0)
    if var <= 1e-15:
        if abs(diff) <= 1e-12:
            return 0.0, 1.0
        return math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(var)
    return float(z), float(2.0 * norm.sf(abs(z)))


def delong_test(y_true: Any, score_a: Any, score_b: Any) -> dict[str, float]:
    """DeLong's test of two correlated AUCs (two classifiers scored on the same cases).

    ``z = (auc_a − auc_b) / sqrt(var_a + var_b − 2 cov)``, two-sided normal p-value.
    When the difference and its variance are both zero (e.g. a score against itself)
    the result is ``z = 0, p = 1``.

    Args:
        y_true: (N,) labels 0/1 with at least two cases of each class.
        score_a: (N,) scores of classifier A.
        score_b: (N,) scores of classifier B on the same cases.

    Returns:
        ``auc_a, auc_b, auc_diff (a − b), var_a, var_b, covariance, z, p_value``.

    Example::

        >>> r = delong_test([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], [0.1, 0.6, 0.4, 0.9])
        >>> r["z"], r["p_value"]
        (0.0, 1.0)
    """
    y, s = _prepare(y_true, {"score_a": score_a, "score_b": score_b})
    aucs, cov = _fast_delong(y, s)
    diff = float(aucs[0] - aucs[1])
    z, p = _two_sided(diff, float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "auc_diff": diff,
        "var_a": float(cov[0, 0]),
        "var_b": float(cov[1, 1]),
        "covariance": float(cov[0, 1]),
        "z": z,
        "p_value": p,
    }


def delong_test_independent(y_true_a: Any, score_a: Any, y_true_b: Any, score_b: Any) -> dict[str, float]:
    """Compare two AUCs measured on two independent test sets.

    ``z = (auc_a − auc_b) / sqrt(var_a + var_b)`` with DeLong variances; two-sided p.

    Args:
        y_true_a: (Na,) labels of test set A; score_a: (Na,) scores on it.
        y_true_b: (Nb,) labels of test set B; score_b: (Nb,) scores on it.

    Returns:
        ``auc_a, auc_b, auc_diff, var_a, var_b, z, p_value``.

    Example::

        >>> r = delong_test_independent([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
        >>> r["auc_a"], r["auc_b"]
        (1.0, 0.75)
    """
    ya = _labels(y_true_a, "y_true_a")
    sa = _scores(score_a, "score_a", ya.size, "y_true_a")
    _both_classes(ya, "y_true_a", minimum=2, why="the DeLong variance")
    yb = _labels(y_true_b, "y_true_b")
    sb = _scores(score_b, "score_b", yb.size, "y_true_b")
    _both_classes(yb, "y_true_b", minimum=2, why="the DeLong variance")
    auc_a, cov_a = _fast_delong(ya, sa[None, :])
    auc_b, cov_b = _fast_delong(yb, sb[None, :])
    diff = float(auc_a[0] - auc_b[0])
    z, p = _two_sided(diff, float(cov_a[0, 0] + cov_b[0, 0]))
    return {
        "auc_a": float(auc_a[0]),
        "auc_b": float(auc_b[0]),
        "auc_diff": diff,
        "var_a": float(cov_a[0, 0]),
        "var_b": float(cov_b[0, 0]),
        "z": z,
        "p_value": p,
    }


def mcnemar_test(y_true: Any, pred_a: Any, pred_b: Any, exact: bool | None = None) -> dict[str, Any]:
    """McNemar's test on the paired correctness of two classifiers' decisions.

    ``b`` counts cases A got right and B wrong, ``c`` cases A got wrong and B right.
    With ``exact=None`` the exact binomial test is used when ``b + c < 25``, otherwise
    the chi-square statistic with continuity correction
    (``statsmodels.stats.contingency_tables.mcnemar`` computes both).

    Args:
        y_true: (N,) true labels (any comparable class labels, e.g. 0/1 or 0..K-1).
        pred_a: (N,) decisions of classifier A.
        pred_b: (N,) decisions of classifier B.
        exact: True for the exact binomial test, False for chi-square, None to choose.

    Returns:
        ``statistic`` (min(b, c) for the exact test, chi-square otherwise), ``p_value``,
        ``b``, ``c``, ``exact`` (the form used).

    Example::

        >>> r = mcnemar_test([1, 1, 0, 0], [1, 1, 0, 1], [0, 1, 1, 1])
        >>> r["b"], r["c"], r["exact"]
        (2, 0, True)
    """
    y = _as_1d(y_true, "y_true")
    a = _as_1d(pred_a, "pred_a")
    b_ = _as_1d(pred_b, "pred_b")
    _check_length(a, "pred_a", y.size, "y_true")
    _check_length(b_, "pred_b", y.size, "y_true")
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise MetricInputError("exact", f"expected True, False or None, got {exact!r}")
    right_a = a == y
    right_b = b_ == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    table = [[int(np.sum(right_a & right_b)), b], [c, int(np.sum(~right_a & ~right_b))]]
    use_exact = bool(b + c < 25) if exact is None else bool(exact)
    if b + c == 0:  # no discordant pairs: no evidence of a difference
        return {"statistic": 0.0, "p_value": 1.0, "b": b, "c": c, "exact": use_exact}
    res = _sm_mcnemar(table, exact=use_exact, correction=True)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "b": b, "c": c, "exact": use_exact}
