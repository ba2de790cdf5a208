"""Choosing a run's operating point (and, optionally, its temperature) on the validation split.

At the end of training, `choose_operating_point` applies the recipe's ``operating_point``
rule (`covidcxr.train.recipe.OperatingPointSection`) to the validation predictions of the
model that is deployed (best checkpoint or snapshot ensemble) — never to the test split —
and returns the `covidcxr.rundir.OperatingPoint` that training stores in
``RUN/operating_point.json``:

* ``fixed``: ``value`` (default 0.5);
* ``youden``: `covidcxr.evaluate.metrics.youden_threshold` (Youden 1950);
* ``sensitivity``: `covidcxr.evaluate.metrics.threshold_at_sensitivity` (target ``value``);
* ``specificity``: `covidcxr.evaluate.metrics.threshold_at_specificity` (target ``value``);

with the validation sensitivity and specificity at the threshold, their 95% intervals
(`covidcxr.evaluate.metrics.binary_metrics_with_ci`, patients kept together) and the
n images / n patients behind them. With ``calibrate: temperature`` the temperature is
fitted first on the validation logits (`covidcxr.evaluate.calibration.fit_temperature`,
Guo et al. 2017) and the threshold is chosen on the calibrated probabilities.

Example:
    >>> spec = OperatingPointSection(rule="sensitivity", value=0.9)                 # doctest: +SKIP
    >>> point = choose_operating_point(spec, y_val, p_val, patients_val)            # doctest: +SKIP
    >>> point.threshold, point.validation["sensitivity"]["estimate"] >= 0.9          # doctest: +SKIP
    (0.31, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from covidcxr.errors import CovidCXRError
from covidcxr.rundir import OperatingPoint
from covidcxr.train.recipe import OperatingPointSection

__all__ = ["choose_operating_point", "threshold_for_rule", "validation_at"]

INTERVAL = "95% interval of covidcxr.evaluate.metrics.binary_metrics_with_ci (patients kept together)"


def validation_at(threshold: float, y: np.ndarray, probability: np.ndarray, patients: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Validation sensitivity and specificity at ``threshold``, with intervals and counts.

    Returns:
        ``{"sensitivity": {estimate, low, high}, "specificity": {...}, "n_images",
        "n_patients", "n_positive", "n_negative", "interval"}``; a metric undefined for
        lack of a class is ``None``.
    """
    from covidcxr.evaluate.metrics import binary_metrics_with_ci

    y = np.asarray(y).astype(np.int64)
    out: dict[str, Any] = {
        "n_images": int(len(y)),
        "n_patients": int(len(set(map(str, patients)))),
        "n_positive": int((y == 1).sum()),
        "n_negative": int((y == 0).sum()),
        "interval": INTERVAL,
        "sensitivity": None,
        "specificity": None,
    }
    if out["n_positive"] and out["n_negative"]:
        ci = binary_metrics_with_ci(y, probability, patients, threshold=threshold, n_boot=n_boot, seed=seed)
        for name in ("sensitivity", "specificity"):
            out[name] = {k: ci[name][k] for k in ("estimate", "low", "high")}
    return out


def threshold_for_rule(spec: OperatingPointSection, y: np.ndarray, probability: np.ndarray) -> float:
    """The threshold the rule picks on ``(y, probability)`` (validation targets and scores).

    Raises:
        CovidCXRError: a data-driven rule and a validation split without both classes.
    """
    from covidcxr.evaluate.metrics import threshold_at_sensitivity, threshold_at_specificity, youden_threshold

    if spec.rule == "fixed":
        return float(spec.target)  # type: ignore[arg-type]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        raise CovidCXRError(
            f"operating_point.rule: '{spec.rule}' needs both classes in the validation split; it has {n_pos} positive and "
            f"{n_neg} negative image(s) (enlarge data.split.val_size, or use rule fixed)"
        )
    if spec.rule == "youden":
        return youden_threshold(y, probability)
    if spec.rule == "sensitivity":
        return threshold_at_sensitivity(y, probability, spec.target)
    return threshold_at_specificity(y, probability, spec.target)


def choose_operating_point(
    spec: OperatingPointSection,
    y: np.ndarray,
    probability: np.ndarray,
    patients: np.ndarray,
    temperature: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    chosen_on: str = "validation",
) -> OperatingPoint:
    """The operating point of a binary run, from its validation predictions.

    Args:
        spec: the recipe's ``operating_point`` section.
        y: ``(N,)`` validation targets 0/1.
        probability: ``(N,)`` validation probabilities of the positive class (calibrated
            when ``temperature`` is given).
        patients: ``(N,)`` patient ids (the intervals resample patients).
        temperature: the fitted temperature, recorded with the point.
        n_boot: resamples behind the intervals.
        seed: seed of the resampling.
        chosen_on: what ``y`` is (``validation``; a k-fold root: pooled validation).

    Raises:
        CovidCXRError: a rule that needs both classes and a validation split without them.
    """
    y = np.asarray(y).astype(np.int64)
    probability = np.asarray(probability, dtype=np.float64)
    threshold = threshold_for_rule(spec, y, probability)
    if spec.rule == "fixed":
        chosen_on = "the recipe"
    return OperatingPoint(
        threshold=float(threshold),
        rule=spec.rule,
        value=spec.target,
        chosen_on=chosen_on if len(y) else "nothing (no validation images)",
        temperature=temperature,
        validation=validation_at(threshold, y, probability, patients, n_boot, seed) if len(y) else {},
    )
