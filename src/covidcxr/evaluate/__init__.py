"""Evaluation: diagnostic metrics, patient-level bootstrap CIs, DeLong and McNemar tests.

The evaluation stage of the data's journey: plain validated functions over 1-D arrays
of labels, scores and patient ids::

    >>> from covidcxr.evaluate import binary_metrics, delong_test
    >>> binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])["auc"]
    0.75

Confidence intervals resample patients, not images (``binary_metrics_with_ci``,
``bootstrap_ci``), so several images of one patient do not narrow the interval.
"""

from covidcxr.evaluate.metrics import (
    BINARY_METRIC_NAMES,
    MetricInputError,
    binary_metrics,
    binary_metrics_with_ci,
    bootstrap_ci,
    confusion_counts,
    metrics_from_counts,
    three_class_accuracy,
    threshold_at_sensitivity,
    threshold_at_specificity,
    two_class_accuracy,
    youden_threshold,
)
from covidcxr.evaluate.stats import delong_test, delong_test_independent, delong_variance, mcnemar_test

__all__ = [
    "BINARY_METRIC_NAMES",
    "MetricInputError",
    "binary_metrics",
    "binary_metrics_with_ci",
    "bootstrap_ci",
    "confusion_counts",
    "delong_test",
    "delong_test_independent",
    "delong_variance",
    "mcnemar_test",
    "metrics_from_counts",
    "three_class_accuracy",
    "threshold_at_sensitivity",
    "threshold_at_specificity",
    "two_class_accuracy",
    "youden_threshold",
]
