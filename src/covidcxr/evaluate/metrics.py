"""Binary and multi-class diagnostic metrics, thresholds and patient-level bootstrap CIs.

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
    "MetricInputError",
    "binary_metrics",
    "binary_metrics_with_ci",
    "bootstrap_ci",
    "confusion_counts",
    "metrics_from_counts",
    "roc_with_band",
    "three_class_accuracy",
    "threshold_at_sensitivity",
    "threshold_at_specificity",
    "two_class_accuracy",
    "youden_threshold",
]

#: The real-valued metrics of :func:`binary_metrics` (those that get a bootstrap CI).
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
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    target = _threshold(sensitivity, "sensitivity")
    if not 0.0 < target <= 1.0:
        raise MetricInputError("sensitivity", f"expected a value in (0, 1], got {sensitivity!r}")
    _both_classes(y, why="a ROC curve")
    _, tpr, thr = roc_curve(y, s, drop_intermediate=False)
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
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    target = _threshold(specificity, "specificity")
    if not 0.0 < target <= 1.0:
        raise MetricInputError("specificity", f"expected a value in (0, 1], got {specificity!r}")
    _both_classes(y, why="a ROC curve")
    fpr, _, thr = roc_curve(y, s, drop_intermediate=False)
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


def binary_metrics_with_ci(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of :func:`binary_metrics` with a patient-level bootstrap percentile CI.

    The cluster bootstrap (patients drawn with replacement, all their images taken) is
    vectorised: each resample is a vector of image multiplicities, so 1000 resamples of
    a few thousand images take a fraction of a second. Per metric, resamples where it is
    undefined (NaN, e.g. no positives drawn) are skipped and counted in ``n_boot_valid``.

    Args:
        y_true: (N,) labels 0/1 with both classes present.
        y_score: (N,) finite scores.
        patient_ids: (N,) patient id of each image.
        threshold: decision threshold (``score >= threshold`` is positive).
        n_boot: number of resamples.
        alpha: 1 − confidence level.
        seed: seed of the resampling generator.

    Returns:
        For each name in :data:`BINARY_METRIC_NAMES` a dict ``{estimate, low, high,
        n_boot_valid}``; plus ``dor_corrected`` (of the estimate), ``tp, fp, tn, fn``
        (ints, full data), ``threshold``, ``n_images``, ``n_patients``, ``n_boot``, ``alpha``.

    Example::

        >>> r = binary_metrics_with_ci([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.6], ["a", "a", "b", "b"], n_boot=100)
        >>> sorted(r["auc"])
        ['estimate', 'high', 'low', 'n_boot_valid']
    """
    point = binary_metrics(y_true, y_score, threshold)
    y = _labels(y_true, "y_true")
    s = _scores(y_score, "y_score", y.size)
    inverse, n_groups = _group_index(patient_ids, y.size, "patient_ids")
    n_boot, alpha = _boot_params(n_boot, alpha)
    rng = np.random.default_rng(seed)
    w = _patient_weights(inverse, n_groups, n_boot, rng)
    pred = (s >= point["threshold"]).astype(np.float64)
    yf = y.astype(np.float64)
    tp = w @ (yf * pred)
    fp = w @ ((1 - yf) * pred)
    tn = w @ ((1 - yf) * (1 - pred))
    fn = w @ (yf * (1 - pred))
    boot = _count_metrics(tp, fp, tn, fn)
    boot["auc"] = _weighted_auc(y, s, w)
    out: dict[str, Any] = {}
    for name in BINARY_METRIC_NAMES:
        low, high, valid = _percentile(np.asarray(boot[name], dtype=np.float64), alpha)
        out[name] = {"estimate": point[name], "low": low, "high": high, "n_boot_valid": valid}
    out["dor_corrected"] = point["dor_corrected"]
    for k in ("tp", "fp", "tn", "fn", "threshold"):
        out[k] = point[k]
    out.update({"n_images": int(y.size), "n_patients": n_groups, "n_boot": n_boot, "alpha": alpha})
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

    The resamples are those of :func:`covidcxr.evaluate.metrics.binary_metrics_with_ci`
    (the same patient multiplicity matrix for the same ``seed``/``n_boot``), so the band
    and the AUC's CI come from one bootstrap. The band is built by vertical averaging
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
        tpr_high}`` on the grid, ``auc_ci`` = ``{low, high}`` of the resampled AUCs,
        ``n_boot_valid``.

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
    aucs = []
    for start in range(0, n_boot, chunk):
        w = weights[start:start + chunk]
        aucs.append(_weighted_auc(y, s, w))
        w_desc = w[:, order]
        tps = np.cumsum(w_desc * y_desc, axis=1)[:, ends]
        fps = np.cumsum(w_desc * (1.0 - y_desc), axis=1)[:, ends]
        n_pos, n_neg = tps[:, -1], fps[:, -1]
        for b in np.flatnonzero((n_pos > 0) & (n_neg > 0)):
            fpr_b = np.r_[0.0, fps[b] / n_neg[b]]
            tpr_b = np.r_[0.0, tps[b] / n_pos[b]]
            # the highest TPR reached at a false-positive rate <= each grid value
            curves.append(tpr_b[np.searchsorted(fpr_b, grid, side="right") - 1])
    auc_values = np.concatenate(aucs)
    auc_values = auc_values[np.isfinite(auc_values)]
    if curves:
        low, high = np.quantile(np.vstack(curves), [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    else:
        low = high = np.full(grid.shape, np.nan)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "band": {"fpr": grid.tolist(), "tpr_low": low.tolist(), "tpr_high": high.tolist()},
        "auc_ci": {
            "low": float(np.quantile(auc_values, alpha / 2.0)) if auc_values.size else None,
            "high": float(np.quantile(auc_values, 1.0 - alpha / 2.0)) if auc_values.size else None,
        },
        "n_boot_valid": len(curves),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
    }
