"""Binary and multi-class diagnostic metrics, thresholds, and patient-clustered confidence intervals.

Plain validated functions over 1-D arrays (MONAI-style functional API). Conventions:

* labels are 0/1 with 1 = positive (COVID-19); a case is predicted positive when
  ``score >= threshold`` (the rule ``sklearn.metrics.roc_curve`` thresholds follow);
* proportions are fractions in [0, 1], never percentages;
* a ratio whose denominator is zero is NaN, never a ``ZeroDivisionError``;
* bad input raises :class:`MetricInputError` (a :class:`~covidcxr.errors.CovidCXRError`)
  naming the argument and what was expected.

Example::

    >>> import numpy as np
    >>> from covidcxr.evaluate.metrics import binary_metrics
    >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
    >>> m["auc"], m["sensitivity"], m["specificity"]
    (0.75, 0.5, 0.5)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from covidcxr.errors import CovidCXRError

__all__ = [
    "BINARY_METRIC_NAMES",
    "CI_DESCRIPTION",
    "CI_METHODS",
    "MetricInputError",
    "auc_ci",
    "binary_metrics",
    "binary_metrics_with_ci",
    "bootstrap_ci",
    "confusion_counts",
    "metrics_from_counts",
    "proportion_ci",
    "roc_with_band",
    "three_class_accuracy",
    "threshold_at_sensitivity",
    "threshold_at_specificity",
    "two_class_accuracy",
    "youden_threshold",
]

#: The real-valued metrics of :func:`binary_metrics` (those that get an interval in :func:`binary_metrics_with_ci`).
BINARY_METRIC_NAMES = (
    "auc", "sensitivity", "specificity", "balanced_accuracy", "dor", "accuracy", "f1", "ppv", "npv",
)


class MetricInputError(CovidCXRError, ValueError):
    """An argument of a metric or statistical test is invalid.

    Attributes:
        argument: the name of the offending argument (``"y_true"``, ``"score_a"``...).
        reason: what was expected.
    """

    def __init__(self, argument: str, reason: str):
        self.argument = argument
        self.reason = reason
        super().__init__(f"{argument}: {reason}")


# --------------------------------------------------------------------------- validation


def _as_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise MetricInputError(name, f"expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise MetricInputError(name, "expected at least one element, got an empty array")
    return arr


def _check_length(arr: np.ndarray, name: str, n: int, ref: str) -> None:
    if arr.shape[0] != n:
        raise MetricInputError(name, f"expected {n} elements (the length of {ref}), got {arr.shape[0]}")


def _labels(values: Any, name: str = "y_true") -> np.ndarray:
    arr = _as_1d(values, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(name, f"expected binary labels 0/1, got values of type {arr.dtype}") from None
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        examples = sorted({str(v) for v in arr[bad][:5].tolist()})
        raise MetricInputError(name, f"expected binary labels 0/1, got {', '.join(examples)}")
    return num.astype(np.int64)


def _scores(values: Any, name: str, n: int, ref: str = "y_true") -> np.ndarray:
    arr = _as_1d(values, name)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(name, f"expected numeric scores, got values of type {arr.dtype}") from None
    _check_length(num, name, n, ref)
    if not np.all(np.isfinite(num)):
        bad = int(np.flatnonzero(~np.isfinite(num))[0])
        raise MetricInputError(name, f"expected finite scores, element {bad} is {num[bad]}")
    return num


def _both_classes(y: np.ndarray, name: str = "y_true", minimum: int = 1, why: str = "the AUC") -> None:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos < minimum or n_neg < minimum:
        raise MetricInputError(
            name,
            f"{why} needs at least {minimum} positive (1) and {minimum} negative (0) case(s), "
            f"got {n_pos} positive and {n_neg} negative",
        )


def _threshold(value: Any, name: str = "threshold") -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise MetricInputError(name, f"expected a real number, got {value!r}") from None
    if math.isnan(t):
        raise MetricInputError(name, "expected a real number, got NaN")
    return t


# --------------------------------------------------------------------------- point metrics


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Confusion-matrix cells of binary decisions.

    Args:
        y_true: (N,) true labels, 0/1 (1 = positive).
        y_pred: (N,) predicted labels, 0/1.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as ints.

    Example::

        >>> confusion_counts([1, 1, 0, 0], [1, 0, 1, 0])
        {'tp': 1, 'fp': 1, 'tn': 1, 'fn': 1}
    """
    y = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    _check_length(p, "y_pred", y.size, "y_true")
    return {
        "tp": int(np.sum((y == 1) & (p == 1))),
        "fp": int(np.sum((y == 0) & (p == 1))),
        "tn": int(np.sum((y == 0) & (p == 0))),
        "fn": int(np.sum((y == 1) & (p == 0))),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _count_metrics(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """Vectorised metrics from (possibly arrays of) counts; NaN where undefined."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    has_both = ((tp + fn) > 0) & ((tn + fp) > 0)
    corrected = has_both & ((tp == 0) | (fp == 0) | (tn == 0) | (fn == 0))
    h = np.where(corrected, 0.5, 0.0)  # Haldane-Anscombe: 0.5 added to every cell
    dor = _ratio((tp + h) * (tn + h), (fp + h) * (fn + h))
    dor = np.where(has_both, dor, np.nan)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2.0,
        "dor": dor,
        "dor_corrected": corrected,
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "f1": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, Any]:
    """Diagnostic metrics of a confusion matrix (e.g. one a paper published).

    The diagnostic odds ratio is ``(tp * tn) / (fp * fn)``; when any cell is zero (and
    both classes are present) the Haldane–Anscombe correction adds 0.5 to every cell
    and ``dor_corrected`` is True. Undefined ratios (zero denominators) are NaN.

    Args:
        tp, fp, tn, fn: non-negative integer counts.

    Returns:
        ``sensitivity, specificity, balanced_accuracy, dor, dor_corrected, accuracy, f1,
        ppv, npv`` (fractions / floats), and ``tp, fp, tn, fn, n`` (ints).

    Example::

        >>> m = metrics_from_counts(tp=20, fp=5, tn=15, fn=10)
        >>> m["dor"], m["sensitivity"]
        (6.0, 0.6666666666666666)
    """
    counts = {}
    for name, value in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise MetricInputError(name, f"expected a non-negative integer count, got {value!r}") from None
        if not math.isfinite(f) or f < 0 or f != int(f):
            raise MetricInputError(name, f"expected a non-negative integer count, got {value!r}")
        counts[name] = int(f)
    vec = _count_metrics(counts["tp"], counts["fp"], counts["tn"], counts["fn"])
    out: dict[str, Any] = {k: (bool(v) if k == "dor_corrected" else float(v)) for k, v in vec.items()}
    out.update(counts)
    out["n"] = sum(counts.values())
    return out


def binary_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> dict[str, Any]:
    """AUC and threshold metrics of binary scores.

    Args:
        y_true: (N,) labels 0/1 (1 = positive); both classes must be present (for the AUC).
        y_score: (N,) finite scores, higher = more likely positive (e.g. probabilities).
        threshold: a case is predicted positive when ``y_score >= threshold``.

    Returns:
        ``auc, sensitivity, specificity, balanced_accuracy, dor, dor_corrected, accuracy,
        f1, ppv, npv, tp, fp, tn, fn, threshold, n``. ``dor_corrected`` is True when a
        zero cell made the DOR use the Haldane–Anscombe correction (0.5 added to every
        cell). Undefined ratios are NaN.

    Raises:
        MetricInputError: lengths differ, labels not 0/1, scores not finite, one class only.

    Example::

        >>> binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])["auc"]
        0.75
    """
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    t = _threshold(threshold)
    _both_classes(y)
    out: dict[str, Any] = {"auc": float(roc_auc_score(y, s))}
    counts = confusion_counts(y, (s >= t).astype(np.int64))
    m = metrics_from_counts(**counts)
    out.update({k: m[k] for k in BINARY_METRIC_NAMES if k != "auc"})
    out["dor_corrected"] = m["dor_corrected"]
    out.update(counts)
    out["threshold"] = t
    out["n"] = int(y.size)
    return out


# --------------------------------------------------------------------------- thresholds


def youden_threshold(y_true: Any, y_score: Any) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity − 1.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.

    Returns:
        A threshold ``t`` (one of the observed scores) for the rule ``score >= t``;
        among thresholds tying on J, the highest is returned.

    Example::

        >>> youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8])
        0.7
    """
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    _both_classes(y, why="a ROC curve")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thr[int(np.argmax(j))])


def _roc_for_target(y_true: Any, y_score: Any, value: Any, name: str) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """Validated labels, scores and target in (0, 1], and the full ROC curve ``(fpr, tpr, thresholds)``."""
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    target = _threshold(value, name)
    if not 0.0 < target <= 1.0:
        raise MetricInputError(name, f"expected a value in (0, 1], got {value!r}")
    _both_classes(y, why="a ROC curve")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return y, s, target, fpr, tpr, thr


def threshold_at_sensitivity(y_true: Any, y_score: Any, sensitivity: float = 0.9) -> float:
    """The highest threshold whose sensitivity reaches ``sensitivity`` (best specificity there).

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        sensitivity: the target sensitivity, in (0, 1].

    Returns:
        A threshold ``t`` (an observed score) such that ``score >= t`` has sensitivity
        ``>= sensitivity``.

    Example::

        >>> threshold_at_sensitivity([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.8], sensitivity=1.0)
        0.2
    """
    _, _, target, _, tpr, thr = _roc_for_target(y_true, y_score, sensitivity, "sensitivity")
    ok = np.flatnonzero((tpr >= target - 1e-12) & np.isfinite(thr))
    return float(thr[ok[0]])


def threshold_at_specificity(y_true: Any, y_score: Any, specificity: float = 0.9) -> float:
    """The lowest threshold whose specificity reaches ``specificity`` (best sensitivity there).

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        specificity: the target specificity, in (0, 1].

    Returns:
        A threshold ``t`` such that ``score >= t`` has specificity ``>= specificity``: an
        observed score, or (when even the highest score is a negative's and the target is
        1) the next float above the highest negative score.

    Example::

        >>> threshold_at_specificity([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.8], specificity=1.0)
        0.8
    """
    y, s, target, fpr, _, thr = _roc_for_target(y_true, y_score, specificity, "specificity")
    ok = np.flatnonzero((1.0 - fpr >= target - 1e-12) & np.isfinite(thr))
    if len(ok) == 0:
        return float(np.nextafter(s[y == 0].max(), np.inf))
    return float(thr[ok[-1]])


# --------------------------------------------------------------------------- multi-class


def _confusion_matrix(y_true: Any, y_pred: Any, confusion: Any, num_classes: int | None) -> np.ndarray:
    if confusion is not None:
        if y_true is not None or y_pred is not None:
            raise MetricInputError("confusion", "give either a confusion matrix or y_true and y_pred, not both")
        cm = np.asarray(confusion, dtype=np.float64)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
            raise MetricInputError("confusion", f"expected a square K x K matrix with K >= 2, got shape {cm.shape}")
        if num_classes is not None and cm.shape[0] != num_classes:
            raise MetricInputError("confusion", f"expected a {num_classes} x {num_classes} matrix, got {cm.shape}")
        if not np.all(np.isfinite(cm)) or np.any(cm < 0):
            raise MetricInputError("confusion", "expected non-negative finite counts")
        return cm
    if y_true is None or y_pred is None:
        raise MetricInputError("y_true", "give y_true and y_pred (integer class labels) or confusion")
    y = _as_1d(y_true, "y_true")
    p = _as_1d(y_pred, "y_pred")
    _check_length(p, "y_pred", y.size, "y_true")
    k = num_classes if num_classes is not None else int(max(y.max(), p.max())) + 1
    for arr, name in ((y, "y_true"), (p, "y_pred")):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= k:
            raise MetricInputError(name, f"expected integer class labels in 0..{k - 1}")
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (y.astype(np.int64), p.astype(np.int64)), 1.0)
    return cm


def three_class_accuracy(y_true: Any = None, y_pred: Any = None, *, confusion: Any = None) -> float:
    """Overall accuracy of a 3-class task (Apostolopoulos & Mpesiana 2020, "3-class accuracy").

    Args:
        y_true: (N,) integer labels in 0..2, or None when ``confusion`` is given.
        y_pred: (N,) integer predictions in 0..2.
        confusion: (3, 3) counts, rows = true class, columns = predicted class.

    Returns:
        trace / total (NaN for an empty matrix).

    Example::

        >>> three_class_accuracy(confusion=[[8, 1, 1], [0, 9, 1], [0, 0, 10]])
        0.9
    """
    cm = _confusion_matrix(y_true, y_pred, confusion, 3)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else math.nan


def two_class_accuracy(y_true: Any = None, y_pred: Any = None, *, confusion: Any = None, covid_class: int = 0) -> float:
    """COVID vs non-COVID accuracy after merging the other classes (Apostolopoulos 2020, "2-class").

    A case counts as correct when it is COVID and predicted COVID, or non-COVID and
    predicted any non-COVID class (a bacterial pneumonia called "normal" is correct).

    Args:
        y_true: (N,) integer labels, or None when ``confusion`` is given.
        y_pred: (N,) integer predictions.
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        covid_class: the index of the COVID-19 class.

    Returns:
        The merged 2-class accuracy (NaN for an empty matrix).

    Example::

        >>> two_class_accuracy(confusion=[[8, 1, 1], [0, 9, 1], [0, 0, 10]], covid_class=0)
        0.9333333333333333
    """
    cm = _confusion_matrix(y_true, y_pred, confusion, None)
    k = cm.shape[0]
    if not isinstance(covid_class, (int, np.integer)) or not 0 <= covid_class < k:
        raise MetricInputError("covid_class", f"expected a class index in 0..{k - 1}, got {covid_class!r}")
    others = [i for i in range(k) if i != covid_class]
    correct = cm[covid_class, covid_class] + cm[np.ix_(others, others)].sum()
    total = cm.sum()
    return float(correct / total) if total > 0 else math.nan


# --------------------------------------------------------------------------- patient bootstrap


def _group_index(groups: Any, n: int, name: str) -> tuple[np.ndarray, int]:
    g = _as_1d(groups, name)
    _check_length(g, name, n, "y_true")
    if g.dtype.kind == "f" and np.any(np.isnan(g.astype(np.float64))):
        raise MetricInputError(name, "expected a patient id for every image, got NaN")
    if g.dtype == object and any(v is None for v in g.tolist()):
        raise MetricInputError(name, "expected a patient id for every image, got None")
    _, inverse = np.unique(g.astype(str) if g.dtype == object else g, return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1


def _boot_params(n_boot: Any, alpha: Any) -> tuple[int, float]:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MetricInputError("n_boot", f"expected a positive integer, got {n_boot!r}")
    a = _threshold(alpha, "alpha")
    if not 0.0 < a < 1.0:
        raise MetricInputError("alpha", f"expected a value in (0, 1), got {alpha!r}")
    return int(n_boot), a


def _patient_weights(inverse: np.ndarray, n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, N) image multiplicities of a cluster bootstrap drawing patients with replacement."""
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    offsets = (np.arange(n_boot) * n_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return counts[:, inverse].astype(np.float64)


def _percentile(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return math.nan, math.nan, 0
    low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high), int(valid.size)


def bootstrap_ci(
    y_true: Any,
    y_score: Any,
    groups: Any,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Patient-level (cluster) bootstrap percentile CI of any metric.

    Each resample draws patients with replacement and takes all of their images, so
    several images of one patient are not counted as independent evidence. Resamples
    where ``metric_fn`` is undefined (it raises :class:`MetricInputError`/``ValueError``
    or returns a non-finite value, e.g. an AUC of a resample holding one class) are
    skipped; ``n_boot_valid`` counts those that were kept.

    Args:
        y_true: (N,) labels 0/1.
        y_score: (N,) finite scores.
        groups: (N,) patient ids (any hashable values), one per image.
        metric_fn: ``metric_fn(y_true, y_score) -> float``, e.g. ``sklearn.metrics.roc_auc_score``.
        n_boot: number of resamples.
        alpha: 1 − confidence level (0.05 → 95 % interval).
        seed: seed of the ``numpy.random.default_rng`` that draws the resamples.

    Returns:
        ``estimate`` (metric on all data), ``low``, ``high``, ``n_images``,
        ``n_patients``, ``n_boot_valid``.

    Example::

        >>> from sklearn.metrics import roc_auc_score
        >>> ci = bootstrap_ci([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.6], ["a", "a", "b", "b"], roc_auc_score, n_boot=50)
        >>> ci["n_patients"]
        2
    """
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    inverse, n_groups = _group_index(groups, y.size, "groups")
    n_boot, alpha = _boot_params(n_boot, alpha)
    if not callable(metric_fn):
        raise MetricInputError("metric_fn", f"expected a callable metric_fn(y_true, y_score), got {metric_fn!r}")
    estimate = float(metric_fn(y, s))
    members = [np.flatnonzero(inverse == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    values = np.full(n_boot, np.nan)
    for b in range(n_boot):
        drawn = rng.integers(0, n_groups, size=n_groups)
        idx = np.concatenate([members[g] for g in drawn])
        try:
            with warnings.catch_warnings():  # e.g. sklearn's one-class AUC warning; such resamples are skipped
                warnings.simplefilter("ignore")
                values[b] = float(metric_fn(y[idx], s[idx]))
        except ValueError:  # MetricInputError is a ValueError; so is sklearn's one-class AUC error
            continue
    low, high, valid = _percentile(values, alpha)
    return {
        "estimate": estimate,
        "low": low,
        "high": high,
        "n_images": int(y.size),
        "n_patients": n_groups,
        "n_boot_valid": valid,
    }


def _weighted_auc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUCs (Mann–Whitney, ties count 1/2) of B weighted resamples at once; NaN for one class."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    pos = y[order].astype(np.float64)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    p_lvl = np.add.reduceat(w * pos, starts, axis=1)
    n_lvl = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    n_below = np.cumsum(n_lvl, axis=1) - n_lvl
    num = np.sum(p_lvl * (n_below + 0.5 * n_lvl), axis=1)
    return _ratio(num, p_lvl.sum(axis=1) * n_lvl.sum(axis=1))


# --------------------------------------------------------------------------- clustered intervals
#
# Why not the percentile bootstrap: with 16 of 16 positives detected every resample has
# sensitivity 1 and the interval is [1, 1]; with 30-40 patients per class and a true
# sensitivity of 0.95-0.99 the nominal 95 % percentile intervals covered the truth 72-75 %
# of the time (benchmarks/bench_coverage.py measures it). The intervals below are analytic
# (no resampling, deterministic): a proportion's interval is Wilson's score interval on the
# design-effect-adjusted ("effective") sample size, the AUC's a score-type interval on the
# effective numbers of positives and negatives. Both reach 1 only as a limit: they keep
# their width when every case is classified correctly.

#: The interval method of each metric of :func:`binary_metrics_with_ci` (``method`` key).
CI_METHODS = {
    "auc": "newcombe-score-obuchowski",
    "sensitivity": "wilson-design-effect",
    "specificity": "wilson-design-effect",
    "accuracy": "wilson-design-effect",
    "ppv": "wilson-design-effect",
    "npv": "wilson-design-effect",
    "f1": "wilson-design-effect-jaccard",
    "balanced_accuracy": "mover-wilson",
    "dor": "woolf-design-effect",
}

#: A sentence saying how :func:`binary_metrics_with_ci`'s intervals are computed (for reports).
CI_DESCRIPTION = (
    "proportions: Wilson score interval on the patient-clustering effective sample size (Rao & Scott 1992); "
    "balanced accuracy: MOVER from the sensitivity and specificity intervals (Zou & Donner 2008); "
    "DOR: Woolf's log interval on effective counts; AUC: Newcombe's score-type interval on the "
    "effective numbers of positives and negatives (design effects from Obuchowski's 1997 clustered variance)"
)


def _z(alpha: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(1.0 - alpha / 2.0))


def _design_effect(success: np.ndarray, cluster: np.ndarray) -> tuple[float, float, int]:
    """Clustered design effect of the ratio estimate ``sum(success) / n`` (Rao & Scott 1992).

    Args:
        success: (n,) 0/1 outcome of each image in the denominator.
        cluster: (n,) patient index (0..K-1, need not be dense) of each image.

    Returns:
        ``(design_effect, kish_max, n_patients)``. The design effect is the ratio of the
        cluster-robust variance of the ratio estimator, ``K / (K - 1) * sum_i (x_i - p m_i)^2 / n^2``,
        to the binomial ``p (1 - p) / n``, clipped to ``[1, kish_max]``; ``kish_max =
        sum_i m_i^2 / n`` is its value when a patient's images always agree (Kish 1965).
        Where it cannot be estimated (every outcome equal, as when 16 of 16 are detected,
        or one patient) it is ``kish_max``: with no disagreement to measure the correlation
        from, a patient's images are assumed to agree, which is the conservative choice.
    """
    n = success.size
    _, dense = np.unique(cluster, return_inverse=True)
    dense = dense.reshape(-1)
    m_i = np.bincount(dense).astype(np.float64)
    x_i = np.bincount(dense, weights=success.astype(np.float64))
    k = m_i.size
    kish_max = float(np.sum(m_i**2) / n)
    p = float(x_i.sum() / n)
    if k < 2 or p <= 0.0 or p >= 1.0:
        return kish_max, kish_max, k
    robust = k / (k - 1) * float(np.sum((x_i - p * m_i) ** 2)) / n**2
    deff = robust / (p * (1.0 - p) / n)
    return float(min(max(deff, 1.0), kish_max)), kish_max, k


def _wilson(x: float, n: float, alpha: float) -> tuple[float, float]:
    """Wilson (1927) score interval (statsmodels), for real-valued (effective) counts too."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(x, n, alpha=alpha, method="wilson")
    return float(min(max(low, 0.0), x / n)), float(max(min(high, 1.0), x / n))


def _proportion(success: np.ndarray, cluster: np.ndarray, alpha: float) -> dict[str, Any]:
    """Estimate and clustered interval of a proportion; NaN when the denominator is empty."""
    if success.size == 0:
        return {"estimate": math.nan, "low": math.nan, "high": math.nan, "n_images": 0,
                "n_patients": 0, "n_effective": 0.0, "design_effect": math.nan}
    deff, _, k = _design_effect(success, cluster)
    p = float(success.mean())
    n_eff = success.size / deff
    low, high = _wilson(p * n_eff, n_eff, alpha)
    return {"estimate": p, "low": low, "high": high, "n_images": int(success.size),
            "n_patients": k, "n_effective": n_eff, "design_effect": deff}


def proportion_ci(successes: Any, patient_ids: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Wilson score interval of a proportion of images, on the patient-clustered effective n.

    The images of one patient are correlated, so ``x`` successes among ``n`` images carry
    less information than ``n`` independent trials. The design effect ``d`` (the
    cluster-robust variance of the ratio estimator over the binomial one; Rao JNK & Scott AJ,
    "A simple method for the analysis of clustered binary data", Biometrics 1992; 48:577)
    turns them into ``n / d`` effective trials with ``p n / d`` successes, and the Wilson
    score interval (Wilson 1927; statsmodels' ``proportion_confint(method="wilson")``) is
    taken there. Why Wilson: unlike the Wald interval and the percentile bootstrap it does
    not collapse at 0 or 1 (16 of 16 detected in 16 patients gives [0.806, 1.0], close to
    Clopper-Pearson's [0.794, 1.0]), and its coverage is close to nominal on average where
    Clopper-Pearson's is well above it (Brown LD, Cai TT & DasGupta A, "Interval estimation
    for a binomial proportion", Statist Sci 2001; 16:101 recommend Wilson for small n).
    Measured on clustered simulations (``benchmarks/bench_coverage.py``): Clopper-Pearson on
    the same effective n covered 95-100 % (mean 97.6 %), Wilson 91-99 % (mean 95.6 %).
    When ``d`` cannot be estimated (all outcomes equal, or one patient) a patient's images
    are assumed to agree (``d = sum m_i^2 / n``, Kish's full-correlation value), the
    conservative choice: 16 of 16 images of 8 patients gets the interval of 8 of 8.

    Args:
        successes: (N,) 0/1 outcome of each image (e.g. "detected" for the COVID images).
        patient_ids: (N,) patient id of each image.
        alpha: 1 - confidence level.

    Returns:
        ``estimate, low, high, n_images, n_patients, n_effective, design_effect, method``.

    Example::

        >>> r = proportion_ci([1] * 16, [f"p{i}" for i in range(16)])
        >>> round(r["low"], 3), r["high"]
        (0.806, 1.0)
    """
    x = _labels(successes, "successes")
    cluster, _ = _group_index(patient_ids, x.size, "patient_ids")
    _, a = _boot_params(1, alpha)
    return {**_proportion(x, cluster, a), "method": CI_METHODS["sensitivity"]}


def _hanley_mcneil_variance(theta: float, m: float, n: float) -> float:
    """Hanley & McNeil (1982) variance of an AUC ``theta`` from m positives and n negatives."""
    q1 = theta / (2.0 - theta)
    q2 = 2.0 * theta**2 / (1.0 + theta)
    return (theta * (1.0 - theta) + (m - 1.0) * (q1 - theta**2) + (n - 1.0) * (q2 - theta**2)) / (m * n)


def auc_ci(y_true: Any, y_score: Any, patient_ids: Any, alpha: float = 0.05) -> dict[str, Any]:
    """AUC with a score-type interval on patient-clustered effective sample sizes.

    The interval is the set of ``theta`` with ``(AUC - theta)^2 <= z^2 V(theta)``, ``V``
    the Hanley & McNeil (1982) variance evaluated at ``theta`` rather than at the estimate
    (Newcombe RG, "Confidence intervals for an effect size measure based on the
    Mann-Whitney statistic. Part 2: asymptotic methods and evaluation", Stat Med 2006;
    25:559): like Wilson's interval for a proportion it stays inside [0, 1] and keeps a
    width at AUC = 1 (a percentile bootstrap gives [1, 1] there). The numbers of positives
    and negatives in ``V`` are effective ones, ``M / d_pos`` and ``N / d_neg``, with each
    class's design effect from Obuchowski's (1997) clustered variance (see
    :func:`covidcxr.evaluate.stats.obuchowski_variance`), clipped to ``[1, sum m_i^2 / M]``
    and set to that upper value where it is undefined (a perfect separation, one patient).
    Newcombe's scheme was chosen over a clustered DeLong Wald interval, which collapses at
    AUC = 1 and exceeds 1 near it; its coverage is measured in ``benchmarks/bench_coverage.py``
    (93-100 % at AUC 0.75-1.0; 96-100 % at AUC >= 0.985, where it is conservative). The effective sizes
    use each class's own clustering; Obuchowski's cross term ``S11`` (a patient with both
    positive and negative images) is not carried into them.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        patient_ids: (N,) patient id of each image.
        alpha: 1 - confidence level.

    Returns:
        ``estimate, low, high, n_images, n_patients, n_effective_positive,
        n_effective_negative, design_effect_positive, design_effect_negative, method``.

    Example::

        >>> r = auc_ci([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], list("abcdef"))
        >>> r["estimate"], r["high"], round(r["low"], 2)
        (1.0, 1.0, 0.5)
    """
    # stats.py imports the validators of this module, so it is imported here, not at the top
    from scipy.optimize import brentq

    from covidcxr.evaluate.stats import obuchowski_variance

    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    cluster, n_groups = _group_index(patient_ids, y.size, "patient_ids")
    _, a = _boot_params(1, alpha)
    _both_classes(y)
    ob = obuchowski_variance(y, s, cluster)
    theta = ob["auc"]
    effective = {}
    for cls, key in ((1, "positive"), (0, "negative")):
        members = cluster[y == cls]
        m_i = np.bincount(members)
        kish_max = float(np.sum(m_i.astype(np.float64) ** 2) / members.size)
        deff = ob[f"design_effect_{key}"]
        deff = kish_max if not math.isfinite(deff) else min(max(deff, 1.0), kish_max)
        effective[key] = (deff, members.size / deff)
    m_eff, n_eff = effective["positive"][1], effective["negative"][1]
    z2 = _z(a) ** 2

    def excess(t: float) -> float:
        return (theta - t) ** 2 - z2 * _hanley_mcneil_variance(t, m_eff, n_eff)

    # excess() is positive at 0 and 1 and negative just inside the estimate (V > 0 in (0, 1)),
    # so each limit is the one root on its side; at AUC 1 (0) the upper (lower) limit is 1 (0).
    eps = 1e-9
    low = 0.0 if theta <= eps else float(brentq(excess, 0.0, theta - eps))
    high = 1.0 if theta >= 1.0 - eps else float(brentq(excess, theta + eps, 1.0))
    return {
        "estimate": theta, "low": low, "high": high, "n_images": int(y.size), "n_patients": n_groups,
        "n_effective_positive": m_eff, "n_effective_negative": n_eff,
        "design_effect_positive": effective["positive"][0], "design_effect_negative": effective["negative"][0],
        "method": CI_METHODS["auc"],
    }


def _mover_mean(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Interval of (a + b) / 2 for independent a, b from their own intervals (MOVER).

    Zou GY & Donner A, "Construction of confidence limits about effect measures: a general
    approach", Stat Med 2008; 27:1693 (Newcombe 1998's method 10 for a difference of
    proportions is the same construction). The limits stay in [0, 1] for proportions.
    """
    low = a["estimate"] + b["estimate"] - math.hypot(a["estimate"] - a["low"], b["estimate"] - b["low"])
    high = a["estimate"] + b["estimate"] + math.hypot(a["high"] - a["estimate"], b["high"] - b["estimate"])
    return low / 2.0, high / 2.0


def _woolf_dor(point: dict[str, Any], sens: dict[str, Any], spec: dict[str, Any], alpha: float) -> tuple[float, float]:
    """Woolf's (1955) log-DOR interval with each class's cells divided by its design effect.

    ``var(log DOR) = sum over cells of 1 / (effective cell + h)``, ``h = 0.5`` when a cell is
    zero (Haldane 1956, the correction the estimate uses). Centred on the reported DOR.
    """
    if not (math.isfinite(point["dor"]) and math.isfinite(sens["design_effect"]) and math.isfinite(spec["design_effect"])):
        return math.nan, math.nan
    h = 0.5 if point["dor_corrected"] else 0.0
    cells = (point["tp"] / sens["design_effect"], point["fn"] / sens["design_effect"],
             point["tn"] / spec["design_effect"], point["fp"] / spec["design_effect"])
    se = math.sqrt(sum(1.0 / (c + h) for c in cells))
    centre = math.log(point["dor"])
    return math.exp(centre - _z(alpha) * se), math.exp(centre + _z(alpha) * se)


def binary_metrics_with_ci(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of :func:`binary_metrics` with a patient-clustered 95 % interval.

    The intervals are analytic, keep their width at 0 and 1 and count a patient's images
    as correlated (see :data:`CI_METHODS`, :data:`CI_DESCRIPTION`):

    * sensitivity, specificity, accuracy, PPV, NPV: :func:`proportion_ci` (Wilson on the
      design-effect-adjusted n) over the images in each denominator;
    * F1 through the Jaccard index ``J = tp / (tp + fp + fn)``, a proportion of the images
      that are positive or called positive: its interval mapped by ``F1 = 2J / (1 + J)``;
    * balanced accuracy: MOVER (Zou & Donner 2008) from the sensitivity and specificity
      intervals (independent when a patient's images share one label);
    * DOR: Woolf's log interval on effective counts (Haldane-corrected with a zero cell);
    * AUC: :func:`auc_ci` (Newcombe's score-type interval, Obuchowski's design effects).

    Their coverage (simulated patients with 1-3 correlated images, true values 0.8-1.0,
    AUC 0.75-1.0) is in ``benchmarks/bench_coverage.py``.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        patient_ids: (N,) patient id of each image.
        threshold: decision threshold (``score >= threshold`` is positive).
        n_boot: validated and echoed for callers that pass it (the ROC band of
            :func:`roc_with_band` resamples); the intervals here do not resample.
        alpha: 1 − confidence level.
        seed: accepted for the same callers; the result does not depend on it.

    Returns:
        For each name in :data:`BINARY_METRIC_NAMES` a dict ``{estimate, low, high,
        method}`` (proportions add ``n_effective`` and ``design_effect``); plus
        ``dor_corrected`` (of the estimate), ``tp, fp, tn, fn`` (ints, full data),
        ``threshold``, ``n_images``, ``n_patients``, ``n_boot``, ``alpha``, ``ci_method``.
        A metric whose denominator is empty (e.g. PPV with nothing called positive) is NaN
        with a NaN interval.

    Example::

        >>> r = binary_metrics_with_ci([0] * 16 + [1] * 16, [0.2] * 16 + [0.9] * 16, [f"p{i}" for i in range(32)])
        >>> r["sensitivity"]["estimate"], round(r["sensitivity"]["low"], 2), r["sensitivity"]["high"]
        (1.0, 0.81, 1.0)
    """
    point = binary_metrics(y_true, y_score, threshold)
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    cluster, n_groups = _group_index(patient_ids, y.size, "patient_ids")
    n_boot, alpha = _boot_params(n_boot, alpha)
    pred = s >= point["threshold"]
    truth = y == 1
    correct = pred == truth
    parts = {  # (images in the denominator, successes among them)
        "sensitivity": truth, "specificity": ~truth, "accuracy": np.ones_like(truth),
        "ppv": pred, "npv": ~pred, "jaccard": truth | pred,
    }
    props = {name: _proportion(correct[inside], cluster[inside], alpha) for name, inside in parts.items()}
    out: dict[str, Any] = {}
    for name in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
        out[name] = {**props[name], "estimate": point[name], "method": CI_METHODS[name]}
    jac = props["jaccard"]
    out["f1"] = {"estimate": point["f1"], "low": 2 * jac["low"] / (1 + jac["low"]), "high": 2 * jac["high"] / (1 + jac["high"]),
                 "n_effective": jac["n_effective"], "design_effect": jac["design_effect"], "method": CI_METHODS["f1"]}
    low, high = _mover_mean(props["sensitivity"], props["specificity"])
    out["balanced_accuracy"] = {"estimate": point["balanced_accuracy"], "low": low, "high": high, "method": CI_METHODS["balanced_accuracy"]}
    low, high = _woolf_dor(point, props["sensitivity"], props["specificity"], alpha)
    out["dor"] = {"estimate": point["dor"], "low": low, "high": high, "method": CI_METHODS["dor"]}
    auc = auc_ci(y, s, cluster, alpha)
    out["auc"] = {k: auc[k] for k in ("estimate", "low", "high", "method", "design_effect_positive", "design_effect_negative")}
    out = {name: out[name] for name in BINARY_METRIC_NAMES}
    out["dor_corrected"] = point["dor_corrected"]
    for k in ("tp", "fp", "tn", "fn", "threshold"):
        out[k] = point[k]
    out.update({"n_images": int(y.size), "n_patients": n_groups, "n_boot": n_boot, "alpha": alpha, "ci_method": CI_DESCRIPTION})
    return out


def roc_with_band(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    grid_points: int = 101,
    chunk: int = 250,
) -> dict[str, Any]:
    """ROC curve with a pointwise patient-bootstrap confidence band.

    The band resamples patients (``n_boot`` resamples, ``seed``); the AUC's interval
    ``auc_ci`` is :func:`auc_ci`'s, the one :func:`binary_metrics_with_ci` reports, so a
    figure and a table never show two intervals for one AUC. The band is built by vertical averaging
    (Fawcett 2006, "An introduction to ROC analysis", §8.1): each resample's ROC step
    curve is read at fixed false-positive rates and the TPR percentiles taken there.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) scores.
        patient_ids: (N,) patient of each image (the resampling unit).
        n_boot: resamples; seed: their seed (use the evaluation's to match its CIs).
        alpha: 1 − confidence level.
        grid_points: false-positive rates at which the band is read.
        chunk: resamples processed at once (bounds memory to chunk × N floats).

    Returns:
        ``fpr``, ``tpr`` (the curve, sklearn's ``roc_curve``), ``band`` = ``{fpr, tpr_low,
        tpr_high}`` on the grid, ``auc_ci`` = ``{low, high}`` (:func:`auc_ci`),
        ``n_boot_valid`` (resamples holding both classes).

    Example::

        >>> r = roc_with_band([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], ["a", "b", "c", "d"], n_boot=50)
        >>> len(r["band"]["fpr"])
        101
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    fpr, tpr, _ = roc_curve(y, s)
    inverse, n_groups = _group_index(patient_ids, y.size, "patient_ids")
    rng = np.random.default_rng(seed)
    weights = _patient_weights(inverse, n_groups, n_boot, rng)  # the draws binary_metrics_with_ci makes
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    y_desc = y[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s_desc) != 0), y.size - 1]  # last image of each distinct score
    grid = np.linspace(0.0, 1.0, grid_points)
    curves = []
    for start in range(0, n_boot, chunk):
        w = weights[start:start + chunk]
        w_desc = w[:, order]
        tps = np.cumsum(w_desc * y_desc, axis=1)[:, ends]
        fps = np.cumsum(w_desc * (1.0 - y_desc), axis=1)[:, ends]
        n_pos, n_neg = tps[:, -1], fps[:, -1]
        for b in np.flatnonzero((n_pos > 0) & (n_neg > 0)):
            fpr_b = np.r_[0.0, fps[b] / n_neg[b]]
            tpr_b = np.r_[0.0, tps[b] / n_pos[b]]
            # the highest TPR reached at a false-positive rate <= each grid value
            curves.append(tpr_b[np.searchsorted(fpr_b, grid, side="right") - 1])
    auc = auc_ci(y, s, inverse, alpha)
    if curves:
        low, high = np.quantile(np.vstack(curves), [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    else:
        low = high = np.full(grid.shape, np.nan)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "band": {"fpr": grid.tolist(), "tpr_low": low.tolist(), "tpr_high": high.tolist()},
        "auc_ci": {"low": auc["low"], "high": auc["high"]},
        "n_boot_valid": len(curves),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
    }
