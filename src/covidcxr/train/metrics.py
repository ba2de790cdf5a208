"""The metrics training needs for monitoring and its run summary (AUC, accuracy, balanced accuracy...).

Plain functions over numpy arrays (scikit-learn underneath). Confidence intervals,
DeLong and McNemar tests belong to the evaluation stage (``covidcxr.evaluate``); this
module only gives the point estimates a training run monitors and writes to
``metrics.json``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["classification_metrics", "probabilities_matrix"]


def probabilities_matrix(probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) positive-class probabilities or (N, K) class probabilities -> (N, K)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1 and num_classes == 2):
        p = p.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return p


def _safe(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def classification_metrics(probabilities: np.ndarray, targets: np.ndarray, num_classes: int, threshold: float = 0.5) -> dict[str, Any]:
    """Point metrics of one set of predictions.

    Args:
        probabilities: (N,) positive-class probabilities (binary) or (N, K).
        targets: (N,) integer targets.
        num_classes: K (2 for a binary task).
        threshold: binary decision threshold on the positive probability (training passes
            the run's operating point, `covidcxr.rundir.OperatingPoint`).

    Returns:
        ``n``, ``auc`` (binary ROC AUC; multi-class: macro one-vs-rest; None when only
        one class is present), ``accuracy``, ``balanced_accuracy``, and for binary tasks
        ``sensitivity``, ``specificity``, the confusion counts ``tp``/``fp``/``tn``/``fn``
        and the ``threshold`` they were counted at.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    p = probabilities_matrix(probabilities, num_classes)
    n = int(len(targets))
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out | {"auc": None, "accuracy": None, "balanced_accuracy": None}
    present = np.unique(targets)
    if num_classes == 2:
        positive = p[:, 1]
        predicted = (positive >= threshold).astype(np.int64)
        auc = roc_auc_score(targets, positive) if len(present) == 2 else float("nan")
    else:
        predicted = p.argmax(axis=1)
        if len(present) == num_classes:
            auc = roc_auc_score(targets, p, multi_class="ovr", average="macro", labels=list(range(num_classes)))
        else:
            auc = float("nan")
    recalls = [float((predicted[targets == c] == c).mean()) for c in present]
    out["auc"] = _safe(float(auc))
    out["accuracy"] = float((predicted == targets).mean())
    out["balanced_accuracy"] = float(np.mean(recalls))
    if num_classes == 2:
        tp = int(((predicted == 1) & (targets == 1)).sum())
        fp = int(((predicted == 1) & (targets == 0)).sum())
        tn = int(((predicted == 0) & (targets == 0)).sum())
        fn = int(((predicted == 0) & (targets == 1)).sum())
        out["sensitivity"] = tp / (tp + fn) if tp + fn else None
        out["specificity"] = tn / (tn + fp) if tn + fp else None
        out.update(tp=tp, fp=fp, tn=tn, fn=fn, threshold=float(threshold))
    return out
