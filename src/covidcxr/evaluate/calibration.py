"""Calibration of predicted probabilities: Brier score, ECE, reliability curve, temperature scaling.

A classifier is *calibrated* when, among the images it gives probability ``p``, a fraction
``p`` is positive. Discrimination (the AUC) says nothing about it: a model can rank every
COVID image above every normal one and still say 0.99 where the truth is 0.6.

Conventions (those of :mod:`covidcxr.evaluate.metrics`):

* binary labels are 0/1 with 1 = positive; probabilities are of the positive class, in [0, 1];
* the ECE and the reliability curve are computed on the positive-class probability (not on
  the top-label confidence Guo et al. use for multi-class models); for a binary model the
  two differ only in how the bins fold around 0.5;
* bins are **equal-width** by default (``strategy="uniform"``, 10 bins on [0, 1]) — the
  convention of Guo et al. (2017) and of most published ECEs, so the number is comparable;
  ``strategy="quantile"`` gives equal-mass bins (every bin holds ~N / n_bins images), which
  have less variance when the probabilities pile up near 0 and 1;
* bad input raises :class:`~covidcxr.evaluate.metrics.MetricInputError` naming the argument.

References:
    Brier G.W. (1950). Verification of forecasts expressed in terms of probability.
    Monthly Weather Review 78(1):1–3.

    Naeini M.P., Cooper G.F., Hauskrecht M. (2015). Obtaining well calibrated probabilities
    using Bayesian binning. AAAI 2015 — defines the expected calibration error (ECE).

    Guo C., Pleiss G., Sun Y., Weinberger K.Q. (2017). On calibration of modern neural
    networks. ICML 2017 — reliability diagrams, equal-width ECE and temperature scaling.

Example::

    >>> from covidcxr.evaluate.calibration import brier_score, expected_calibration_error
    >>> round(brier_score([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3]), 4)
    0.0375
    >>> round(expected_calibration_error([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3], n_bins=2), 3)
    0.175
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, logit, softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from covidcxr.evaluate.curves import bootstrap_statistic
from covidcxr.evaluate.metrics import MetricInputError, _labels, _scores

__all__ = [
    "apply_temperature",
    "brier_score",
    "calibration_with_ci",
    "expected_calibration_error",
    "fit_temperature",
    "probabilities_to_logits",
    "reliability_curve",
]

_STRATEGIES = ("uniform", "quantile")
#: Probabilities are clipped to [EPS, 1 − EPS] before taking logits, so 0 and 1 stay finite.
EPS = 1e-6


# --------------------------------------------------------------------------- validation


def _probabilities(values: Any, name: str, n: int) -> np.ndarray:
    p = _scores(values, name, n)
    if p.min() < 0.0 or p.max() > 1.0:
        bad = int(np.flatnonzero((p < 0.0) | (p > 1.0))[0])
        raise MetricInputError(name, f"expected probabilities in [0, 1], element {bad} is {p[bad]}")
    return p


def _bins(n_bins: Any, strategy: Any) -> tuple[int, str]:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise MetricInputError("n_bins", f"expected a positive integer, got {n_bins!r}")
    if strategy not in _STRATEGIES:
        raise MetricInputError("strategy", f"expected one of {', '.join(_STRATEGIES)}, got {strategy!r}")
    return int(n_bins), str(strategy)


def _bin_ids(p: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and each probability's bin, by the rule of ``sklearn.calibration.calibration_curve``.

    Hand-written because ``calibration_curve`` returns neither the bin counts nor the bin of
    each image, which the ECE weights and the diagram's histogram need; the rule is the same
    (edges ``linspace(0, 1)`` or quantiles of ``p``, ``searchsorted`` on the inner edges), and
    a test checks that both give the same curve.
    """
    if strategy == "quantile":
        edges = np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    else:
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.searchsorted(edges[1:-1], p)


# --------------------------------------------------------------------------- scores


def brier_score(y_true: Any, y_prob: Any) -> float:
    """Brier score: the mean squared difference between probability and outcome (Brier 1950).

    0 is perfect; always saying the prevalence ``π`` scores ``π(1 − π)``; lower is better.

    Args:
        y_true: (N,) labels 0/1.
        y_prob: (N,) probabilities of the positive class, in [0, 1].

    Returns:
        ``mean((y_prob - y_true) ** 2)``.

    Example::

        >>> brier_score([0, 1], [0.2, 0.6])
        0.1
    """
    y = _labels(y_true, "y_true")
    p = _probabilities(y_prob, "y_prob", y.size)
    return float(brier_score_loss(y, p, pos_label=1))


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error (Naeini et al. 2015; binning of Guo et al. 2017).

    ``ECE = Σ_b (n_b / N) · |mean(y_true in b) − mean(y_prob in b)|`` over the non-empty bins.

    Args:
        y_true: (N,) labels 0/1.
        y_prob: (N,) probabilities of the positive class, in [0, 1].
        n_bins: number of bins.
        strategy: ``"uniform"`` (equal-width bins on [0, 1], the default) or ``"quantile"``
            (equal-mass bins).

    Returns:
        The ECE, in [0, 1].

    Example::

        >>> round(expected_calibration_error([0, 0, 1, 1], [0.2, 0.2, 0.8, 0.8], n_bins=5), 6)
        0.2
    """
    y = _labels(y_true, "y_true")
    p = _probabilities(y_prob, "y_prob", y.size)
    n_bins, strategy = _bins(n_bins, strategy)
    _, ids = _bin_ids(p, n_bins, strategy)
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    gap = np.abs(np.bincount(ids, weights=y, minlength=n_bins) - np.bincount(ids, weights=p, minlength=n_bins))
    # per bin |Σy − Σp| = n_b · |mean y − mean p|, so the sum / N is the count-weighted gap
    return float(gap[count > 0].sum() / y.size)


def reliability_curve(y_true: Any, y_prob: Any, n_bins: int = 10, strategy: str = "uniform") -> dict[str, Any]:
    """The points of a reliability diagram (Guo et al. 2017, Fig. 1), with the images per bin.

    Uses ``sklearn.calibration.calibration_curve`` for the curve; empty bins are left out.

    Args:
        y_true: (N,) labels 0/1.
        y_prob: (N,) probabilities of the positive class, in [0, 1].
        n_bins: number of bins.
        strategy: ``"uniform"`` (equal-width) or ``"quantile"`` (equal-mass).

    Returns:
        ``prob_pred`` (mean probability per non-empty bin), ``prob_true`` (fraction positive
        there), ``count`` (images there), ``bin`` (its index, 0..n_bins−1) — four lists of
        equal length, ordered by probability — plus ``edges`` (n_bins + 1 bin edges), ``strategy``, ``n_bins``, ``n``.

    Example::

        >>> r = reliability_curve([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9], n_bins=2)
        >>> r["prob_true"], r["count"]
        ([0.0, 1.0], [2, 2])
    """
    y = _labels(y_true, "y_true")
    p = _probabilities(y_prob, "y_prob", y.size)
    n_bins, strategy = _bins(n_bins, strategy)
    edges, ids = _bin_ids(p, n_bins, strategy)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    count = np.bincount(ids, minlength=n_bins)
    return {
        "prob_pred": [float(v) for v in prob_pred],
        "prob_true": [float(v) for v in prob_true],
        "count": [int(c) for c in count[count > 0]],
        "bin": [int(i) for i in np.flatnonzero(count > 0)],
        "edges": [float(e) for e in edges],
        "strategy": strategy,
        "n_bins": n_bins,
        "n": int(y.size),
    }


def calibration_with_ci(
    y_true: Any,
    y_prob: Any,
    patient_ids: Any,
    n_bins: int = 10,
    strategy: str = "uniform",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Brier score and ECE with patient-level bootstrap percentile intervals, and the curve.

    Patients are drawn with replacement with all their images
    (:func:`covidcxr.evaluate.curves.bootstrap_statistic`, vectorised), so several images of
    one patient do not narrow the intervals. The bins stay those of the full data (for
    ``"quantile"`` the resamples reuse its edges). The ECE is biased upwards in small
    samples (a sparse bin's gap is mostly noise), so its interval says how unstable the
    number is, not where the truth is.

    Args:
        y_true: (N,) labels 0/1.
        y_prob: (N,) probabilities of the positive class.
        patient_ids: (N,) patient of each image.
        n_bins, strategy: the binning of :func:`expected_calibration_error`.
        n_boot, alpha, seed: the bootstrap's resamples, 1 − confidence level and seed.

    Returns:
        ``brier`` and ``ece`` as ``{estimate, low, high, n_boot_valid}``; ``curve`` (the
        :func:`reliability_curve`); ``n_images``, ``n_patients``, ``n_bins``, ``strategy``,
        ``alpha``.

    Example::

        >>> r = calibration_with_ci([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9], ["a", "a", "b", "b"], n_boot=50)
        >>> sorted(r["ece"])
        ['estimate', 'high', 'low', 'n_boot_valid']
    """
    y = _labels(y_true, "y_true")
    p = _probabilities(y_prob, "y_prob", y.size)
    n_bins, strategy = _bins(n_bins, strategy)
    _, ids = _bin_ids(p, n_bins, strategy)
    onehot = np.eye(n_bins)[ids]  # (N, n_bins)

    def brier(w: np.ndarray) -> np.ndarray:
        return (w @ (p - y) ** 2) / w.sum(axis=1)

    def ece(w: np.ndarray) -> np.ndarray:
        return np.abs(w @ (onehot * y[:, None]) - w @ (onehot * p[:, None])).sum(axis=1) / w.sum(axis=1)

    out: dict[str, Any] = {}
    for name, fn, estimate in (("brier", brier, brier_score(y, p)), ("ece", ece, expected_calibration_error(y, p, n_bins, strategy))):
        ci = bootstrap_statistic(fn, patient_ids, y.size, n_boot=n_boot, alpha=alpha, seed=seed)
        out[name] = {"estimate": estimate, "low": ci["low"], "high": ci["high"], "n_boot_valid": ci["n_boot_valid"]}
        out["n_patients"] = ci["n_patients"]
    out["n_images"] = int(y.size)
    out["curve"] = reliability_curve(y, p, n_bins=n_bins, strategy=strategy)
    out.update({"n_bins": n_bins, "strategy": strategy, "alpha": float(alpha)})
    return out


# --------------------------------------------------------------------------- temperature scaling


def probabilities_to_logits(y_prob: Any) -> np.ndarray:
    """Logits of stored probabilities, for temperature scaling of a run's predictions.

    Args:
        y_prob: (N,) positive-class probabilities, or (N, K) class probabilities.

    Returns:
        (N,) ``log(p / (1 − p))`` or (N, K) ``log p`` (softmax logits up to a constant per
        row, which softmax ignores), with ``p`` clipped to ``[EPS, 1 − EPS]`` so 0 and 1 stay finite.

    Example::

        >>> probabilities_to_logits([0.5, 0.8]).round(3).tolist()
        [0.0, 1.386]
    """
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim not in (1, 2) or p.size == 0:
        raise MetricInputError("y_prob", f"expected a non-empty (N,) or (N, K) array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise MetricInputError("y_prob", "expected finite probabilities in [0, 1]")
    p = np.clip(p, EPS, 1.0 - EPS)
    return logit(p) if p.ndim == 1 else np.log(p)


def _logits_and_targets(logits: Any, y_true: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim not in (1, 2) or z.size == 0:
        raise MetricInputError("logits", f"expected (N,) binary or (N, K) multi-class logits, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise MetricInputError("logits", "expected finite logits")
    y = np.asarray(y_true).reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise MetricInputError("y_true", f"expected {z.shape[0]} labels (the length of logits), got {y.shape[0]}")
    if z.ndim == 1:
        return z, _labels(y, "y_true")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise MetricInputError("y_true", f"expected integer class labels in 0..{z.shape[1] - 1}")
    return z, y.astype(np.int64)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    if z.ndim == 1:  # binary cross-entropy of sigmoid(z / T), in log space for stability
        s = z / temperature
        return float(-np.mean(y * log_expit(s) + (1 - y) * log_expit(-s)))
    return float(-np.mean(log_softmax(z / temperature, axis=1)[np.arange(y.size), y]))


def fit_temperature(logits: Any, y_true: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017, §4.2): the ``T`` minimising the NLL of ``softmax(z / T)``.

    One parameter, fitted on **validation** data only (never on the test set it is then
    judged on); it changes the probabilities but not their order, so the AUC is unchanged.
    ``T > 1`` softens an over-confident model. The NLL is convex in ``1 / T``; it is minimised
    over ``log T`` with ``scipy.optimize.minimize_scalar`` (bounded).

    Args:
        logits: (N,) logits of a binary model (sigmoid output) or (N, K) logits of a
            softmax model. For stored probabilities use :func:`probabilities_to_logits`.
        y_true: (N,) labels 0/1 (binary) or integer classes 0..K−1 (multi-class).
        bounds: the range searched for ``T``.

    Returns:
        The fitted temperature ``T`` (a float in ``bounds``).

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(size=20000) * 2
        >>> y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
        >>> 2.8 < fit_temperature(3 * z, y) < 3.2  # logits 3x too confident
        True
    """
    z, y = _logits_and_targets(logits, y_true)
    lo, hi = (float(b) for b in bounds)
    if not 0.0 < lo < hi or not math.isfinite(hi):
        raise MetricInputError("bounds", f"expected 0 < low < high, got {bounds!r}")
    res = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(math.log(lo), math.log(hi)), method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Probabilities of temperature-scaled logits (Guo et al. 2017).

    Args:
        logits: (N,) binary logits or (N, K) multi-class logits.
        temperature: ``T > 0`` from :func:`fit_temperature`.

    Returns:
        (N,) ``sigmoid(z / T)`` or (N, K) ``softmax(z / T)``.

    Example::

        >>> apply_temperature([0.0, 2.0], 2.0).round(3).tolist()
        [0.5, 0.731]
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim not in (1, 2) or z.size == 0 or not np.all(np.isfinite(z)):
        raise MetricInputError("logits", f"expected finite (N,) or (N, K) logits, got shape {z.shape}")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise MetricInputError("temperature", f"expected a positive number, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise MetricInputError("temperature", f"expected a positive number, got {temperature!r}")
    return expit(z / t) if z.ndim == 1 else softmax(z / t, axis=1)
