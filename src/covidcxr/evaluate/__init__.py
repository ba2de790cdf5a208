"""Evaluation: diagnostic metrics, patient-level bootstrap CIs, DeLong and McNemar tests.

The evaluation stage of the data's journey: plain validated functions over 1-D arrays
of labels, scores and patient ids::

    >>> from covidcxr.evaluate import binary_metrics, delong_test
    >>> binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])["auc"]
    0.75

Intervals count a patient's images as correlated evidence, so several images of one
patient do not narrow them: ``binary_metrics_with_ci`` (analytic, on design-effect-adjusted
effective sample sizes; ``proportion_ci``, ``auc_ci``; they keep their width at 0 and 1) and
``bootstrap_ci`` (patient bootstrap of any metric).
"""

from covidcxr.evaluate.metrics import (
    BINARY_METRIC_NAMES,
    MetricInputError,
    auc_ci,
    binary_metrics,
    binary_metrics_with_ci,
    bootstrap_ci,
    confusion_counts,
    metrics_from_counts,
    proportion_ci,
    three_class_accuracy,
    threshold_at_sensitivity,
    threshold_at_specificity,
    two_class_accuracy,
    youden_threshold,
)
from covidcxr.evaluate.stats import delong_test, delong_test_independent, delong_variance, mcnemar_test, obuchowski_variance

__all__ = [
    "BINARY_METRIC_NAMES",
    "MetricInputError",
    "auc_ci",
    "binary_metrics",
    "binary_metrics_with_ci",
    "bootstrap_ci",
    "confusion_counts",
    "delong_test",
    "delong_test_independent",
    "delong_variance",
    "mcnemar_test",
    "metrics_from_counts",
    "obuchowski_variance",
    "proportion_ci",
    "three_class_accuracy",
    "threshold_at_sensitivity",
    "threshold_at_specificity",
    "two_class_accuracy",
    "youden_threshold",
]
