"""Points read off a test set's curves: sensitivity at a fixed specificity, and the precision–recall curve.

Both carry a patient-level percentile bootstrap interval (:func:`bootstrap_statistic`: patients
drawn with replacement with all their images, the draws of ``binary_metrics_with_ci``), so several images of one patient do
not narrow them.

*Sensitivity at a fixed specificity* summarises a ROC curve where a screening test would
work (e.g. specificity 0.90 or 0.95). The threshold is read off the **test** ROC curve
itself, so it is an optimistic description of the curve, not an operating point a user
could have chosen in advance (that one is chosen on validation data and stored with the
run); in each bootstrap resample it is read off that resample's curve, so the interval
includes the uncertainty of where the specificity lands (Pepe 2003, "The Statistical
Evaluation of Medical Tests for Classification and Prediction", §4.2: ROC(t) at a fixed
false-positive fraction).

The *precision–recall curve* (Saito & Rehmsmeier 2015, PLoS ONE 10:e0118432) shows what a
positive call is worth at the test set's prevalence; its chance level is the prevalence,
not 0.5. Its summary is the average precision (``sklearn.metrics.average_precision_score``,
the step-wise area without interpolation).

Example::

    >>> import numpy as np
    >>> from covidcxr.evaluate.curves import sensitivity_at_specificity
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1]); s = np.array([.1, .2, .3, .6, .4, .7, .8, .9])
    >>> r = sensitivity_at_specificity(y, s, np.arange(8), specificity=0.75, n_boot=20)
    >>> r["sensitivity"]["estimate"], r["threshold"], r["specificity_achieved"]
    (1.0, 0.4, 0.75)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from covidcxr.evaluate.metrics import MetricInputError, _boot_params, _group_index, _labels, _patient_weights, _scores

__all__ = ["bootstrap_statistic", "precision_recall", "sensitivity_at_specificity"]


def _target(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise MetricInputError("specificity", f"expected a number in (0, 1), got {value!r}") from None
    if not 0.0 < t < 1.0:
        raise MetricInputError("specificity", f"expected a number in (0, 1), got {value!r}")
    return t


# --------------------------------------------------------------------------- vectorised patient bootstrap
# Hand-written rather than bootstrap_ci(metric_fn=sklearn...): sklearn validates its input on
# every call (~1-10 ms), which over 1000 resamples x several groups made a report take
# minutes; a resample here is a row of image multiplicities (the draws of
# binary_metrics_with_ci for the same seed) and every statistic is a weighted sum.


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], np.ndarray], patient_ids: Any, n: int, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, chunk: int = 250,
) -> dict[str, Any]:
    """Percentile interval of a statistic computed on (B, N) image weights of a patient bootstrap.

    Args:
        statistic: maps a (b, N) matrix of image multiplicities to (b,) values (NaN: undefined).
        patient_ids: (N,) patient of each image (the resampling unit).
        n: the number of images N.
        n_boot, alpha, seed: resamples, 1 − confidence level, seed.
        chunk: resamples weighed at once (bounds memory to chunk × N floats).

    Returns:
        ``{low, high, n_boot_valid, n_patients}``.
    """
    inverse, n_groups = _group_index(patient_ids, n, "patient_ids")
    n_boot, alpha = _boot_params(n_boot, alpha)
    weights = _patient_weights(inverse, n_groups, n_boot, np.random.default_rng(seed))
    values = np.concatenate([np.asarray(statistic(weights[k:k + chunk]), dtype=np.float64) for k in range(0, n_boot, chunk)])
    valid = values[np.isfinite(values)]
    low, high = (np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0]) if valid.size else (np.nan, np.nan))
    return {"low": float(low), "high": float(high), "n_boot_valid": int(valid.size), "n_patients": n_groups}


def _weighted_roc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted cumulative (TP, FP) counts at each distinct score, highest first: (b, L) each, and the scores (L,)."""
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s_desc) != 0), y.size - 1]  # last image of each distinct score
    w_desc = w[:, order]
    return np.cumsum(w_desc * y_desc, axis=1)[:, ends], np.cumsum(w_desc * (1.0 - y_desc), axis=1)[:, ends], s_desc[ends]


def _sensitivity_at(y: np.ndarray, s: np.ndarray, w: np.ndarray, specificity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of weights: the highest sensitivity with specificity >= target, its threshold and specificity."""
    tps, fps, thresholds = _weighted_roc(y, s, w)
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tps / n_pos, fps / n_neg
    ok = fpr <= 1.0 - specificity + 1e-12
    # tpr rises with fpr, so the best admissible point is the last one that is admissible
    last = np.where(ok.any(axis=1), ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    rows = np.arange(len(w))
    sens = np.where(last >= 0, tpr[rows, last], 0.0)
    spec = np.where(last >= 0, 1.0 - fpr[rows, last], 1.0)
    undefined = (n_pos[:, 0] == 0) | (n_neg[:, 0] == 0)
    return np.where(undefined, np.nan, sens), np.where(last >= 0, thresholds[last], np.inf), spec


def _average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted average precision Σ (R_k − R_{k−1}) P_k over distinct thresholds (sklearn's, uninterpolated)."""
    tps, fps, _ = _weighted_roc(y, s, w)
    n_pos = tps[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tps / (tps + fps))
        recall = tps / n_pos
    gains = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    return np.where(n_pos[:, 0] > 0, np.sum(gains * precision, axis=1), np.nan)


# --------------------------------------------------------------------------- public


def sensitivity_at_specificity(
    y_true: Any, y_score: Any, patient_ids: Any, specificity: float = 0.9, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
) -> dict[str, Any]:
    """The highest sensitivity whose specificity reaches ``specificity``, with a patient-bootstrap CI.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores (``score >= threshold`` is positive).
        patient_ids: (N,) patient of each image (the resampling unit).
        specificity: the target specificity, in (0, 1).
        n_boot, alpha, seed: bootstrap resamples, 1 − confidence level, seed.

    Returns:
        ``specificity`` (the target), ``sensitivity`` ``{estimate, low, high, n_boot_valid}``,
        ``threshold`` (read off this test set's ROC; None when no threshold reaches the target),
        ``specificity_achieved``, ``n_images``, ``n_patients``.
    """
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    target = _target(specificity)
    if y.min() == y.max():
        raise MetricInputError("y_true", "sensitivity at a specificity needs positive (1) and negative (0) cases")
    sens, threshold, reached = (float(v[0]) for v in _sensitivity_at(y, s, np.ones((1, y.size)), target))
    ci = bootstrap_statistic(lambda w: _sensitivity_at(y, s, w, target)[0], patient_ids, y.size, n_boot, alpha, seed)
    return {
        "specificity": target,
        "sensitivity": {"estimate": sens, "low": ci["low"], "high": ci["high"], "n_boot_valid": ci["n_boot_valid"]},
        "threshold": threshold if np.isfinite(threshold) else None,
        "specificity_achieved": reached,
        "n_images": int(y.size),
        "n_patients": ci["n_patients"],
    }


def precision_recall(
    y_true: Any, y_score: Any, patient_ids: Any, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, max_points: int = 400,
) -> dict[str, Any]:
    """Precision–recall curve, average precision with a patient-bootstrap CI, and the prevalence.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        patient_ids: (N,) patient of each image.
        n_boot, alpha, seed: bootstrap resamples, 1 − confidence level, seed.
        max_points: the curve is thinned to at most this many points (evenly by index,
            end points kept) so ``results.json`` stays small on large test sets.

    Returns:
        ``precision``, ``recall`` (lists, recall decreasing, sklearn's order),
        ``average_precision`` ``{estimate, low, high, n_boot_valid}``, ``prevalence`` (the
        fraction positive: a random score's precision), ``n_positive``, ``n_negative``,
        ``n_images``, ``n_patients``.

    Example::

        >>> r = precision_recall([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6], ["a", "b", "c", "d"], n_boot=20)
        >>> r["average_precision"]["estimate"], r["prevalence"]
        (1.0, 0.5)
    """
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    if y.min() == y.max():
        raise MetricInputError("y_true", "a precision-recall curve needs positive (1) and negative (0) cases")
    precision, recall, _ = precision_recall_curve(y, s)
    if precision.size > max_points:
        keep = np.unique(np.linspace(0, precision.size - 1, max_points).round().astype(int))
        precision, recall = precision[keep], recall[keep]
    ci = bootstrap_statistic(lambda w: _average_precision(y, s, w), patient_ids, y.size, n_boot, alpha, seed)
    return {
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "average_precision": {"estimate": float(average_precision_score(y, s)), "low": ci["low"], "high": ci["high"], "n_boot_valid": ci["n_boot_valid"]},
        "prevalence": float(y.mean()),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "n_images": int(y.size),
        "n_patients": ci["n_patients"],
    }
