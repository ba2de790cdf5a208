"""Patient-clustered intervals: degenerate cases, clustering, determinism and coverage."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from covidcxr.evaluate import MetricInputError, binary_metrics_with_ci, delong_variance
from covidcxr.evaluate.metrics import auc_ci, proportion_ci, roc_with_band
from covidcxr.evaluate.stats import obuchowski_variance

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_coverage.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_coverage", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _clustered(n_patients: int = 60, seed: int = 0, shift: float = 1.2):
    """Patients with 1-3 images sharing a random effect; labels per patient."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_patients)
    per = rng.integers(1, 4, n_patients)
    pid = np.repeat(np.arange(n_patients), per)
    s = 0.8 * rng.normal(size=n_patients)[pid] + 0.6 * rng.normal(size=pid.size) + shift * label[pid]
    return label[pid], s, pid


# ------------------------------------------------------------------ degenerate cases


def test_all_detected_is_not_collapsed_and_close_to_clopper_pearson():
    y = np.r_[np.zeros(16, int), np.ones(16, int)]
    s = np.r_[np.full(16, 0.2), np.full(16, 0.9)]
    r = binary_metrics_with_ci(y, s, [f"p{i}" for i in range(32)])
    cp_low, _ = proportion_confint(16, 16, alpha=0.05, method="beta")  # 0.794
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1"):
        assert r[name]["estimate"] == 1.0 and r[name]["high"] == 1.0
        assert r[name]["low"] < 0.93, name  # the percentile bootstrap gave [1, 1]
    assert r["sensitivity"]["low"] == pytest.approx(cp_low, abs=0.02)
    assert r["auc"]["estimate"] == 1.0 and r["auc"]["high"] == 1.0 and 0.7 < r["auc"]["low"] < 0.97
    assert 1.0 < r["dor"]["low"] < r["dor"]["estimate"] < r["dor"]["high"]


def test_none_detected_interval_starts_at_zero_with_width():
    r = proportion_ci(np.zeros(16, int), [f"p{i}" for i in range(16)])
    assert r["estimate"] == 0.0 and r["low"] == 0.0
    assert r["high"] == pytest.approx(proportion_confint(0, 16, method="wilson")[1])
    assert 0.15 < r["high"] < 0.25


def test_one_patient_counts_as_one_effective_trial():
    r = proportion_ci(np.ones(5, int), ["only"] * 5)
    assert r["n_patients"] == 1 and r["n_effective"] == pytest.approx(1.0)
    assert r["low"] < 0.25 and r["high"] == 1.0


def test_all_images_from_one_patient_give_a_wide_finite_auc_interval():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    r = binary_metrics_with_ci(y, s, ["p"] * 6)
    assert r["n_patients"] == 1
    assert r["auc"]["estimate"] == 1.0 and r["auc"]["low"] < 0.5
    for name in ("sensitivity", "specificity", "accuracy"):
        assert r[name]["low"] < 0.25 and r[name]["high"] == 1.0


# ------------------------------------------------------------------ clustering


def test_clustering_widens_the_intervals():
    y, s, pid = _clustered()
    clustered = binary_metrics_with_ci(y, s, pid, threshold=0.6)
    independent = binary_metrics_with_ci(y, s, np.arange(y.size), threshold=0.6)
    for name in ("auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy"):
        width_c = clustered[name]["high"] - clustered[name]["low"]
        width_i = independent[name]["high"] - independent[name]["low"]
        assert width_c > 1.05 * width_i, name
    assert clustered["sensitivity"]["design_effect"] > 1.0


def test_copies_of_a_patients_image_add_no_information():
    y, s, pid = _clustered(n_patients=80, seed=1)
    once = np.unique(pid, return_index=True)[1]  # one image per patient
    y1, s1, p1 = y[once], s[once], pid[once]
    triple = binary_metrics_with_ci(np.repeat(y1, 3), np.repeat(s1, 3), np.repeat(p1, 3), threshold=0.6)
    single = binary_metrics_with_ci(y1, s1, p1, threshold=0.6)
    for name in ("auc", "sensitivity", "specificity"):
        assert triple[name]["low"] == pytest.approx(single[name]["low"], abs=0.01), name
        assert triple[name]["high"] == pytest.approx(single[name]["high"], abs=0.01), name


def test_obuchowski_reduces_to_delong_with_one_image_per_patient():
    y, s, _ = _clustered(seed=2)
    ob = obuchowski_variance(y, s, np.arange(y.size))
    auc, var = delong_variance(y, s)
    assert ob["auc"] == pytest.approx(auc) and ob["variance"] == pytest.approx(var)
    y, s, pid = _clustered(seed=2)
    assert obuchowski_variance(y, s, pid)["variance"] > var  # correlated images: larger variance


# ------------------------------------------------------------------ determinism, consistency, errors


def test_deterministic_and_independent_of_the_seed():
    y, s, pid = _clustered(seed=3)
    a = binary_metrics_with_ci(y, s, pid, seed=1)
    b = binary_metrics_with_ci(y, s, pid, seed=1)
    c = binary_metrics_with_ci(y, s, pid, seed=2)
    assert a == b
    assert {k: v for k, v in a.items()} == {k: v for k, v in c.items()}


def test_roc_band_reports_the_same_auc_interval():
    y, s, pid = _clustered(seed=4)
    roc = roc_with_band(y, s, pid, n_boot=50)
    r = auc_ci(y, s, pid)
    assert roc["auc_ci"] == {"low": r["low"], "high": r["high"]}
    assert binary_metrics_with_ci(y, s, pid)["auc"]["low"] == r["low"]


def test_proportion_ci_errors_name_the_argument():
    with pytest.raises(MetricInputError, match="successes.*0/1"):
        proportion_ci([0, 2], ["a", "b"])
    with pytest.raises(MetricInputError, match="patient_ids.*expected 2"):
        proportion_ci([0, 1], ["a"])
    with pytest.raises(MetricInputError, match="alpha"):
        proportion_ci([0, 1], ["a", "b"], alpha=1.5)


# ------------------------------------------------------------------ coverage


def test_coverage_at_sensitivity_095_with_clustered_patients():
    """200 replicates of 30 + 30 patients (1-3 correlated images), true sens = spec = 0.95."""
    bench = _bench()
    r = bench.coverage(0.95, 0.95, n_positive=30, prevalence=0.5, replicates=200, seed=11, n_boot=200)
    after, before = r["after"]["coverage"], r["before"]["coverage"]
    for name in ("sensitivity", "specificity", "auc", "balanced_accuracy", "accuracy"):
        assert after[name] >= 0.9, (name, after[name])
    # the percentile bootstrap it replaced fails this test
    assert min(before["sensitivity"], before["specificity"], before["auc"]) < 0.9


def test_one_class_source_keeps_the_interval_width():
    """An unseen COVID-only source with every image detected: [low < 1, 1], not [1, 1]."""
    import pandas as pd

    from covidcxr.evaluate.cross_source import metrics_for_rows

    rows = pd.DataFrame({"target": [1] * 20, "probability": [0.9] * 20, "patient_id": [f"p{i // 2}" for i in range(20)]})
    m = metrics_for_rows(rows, threshold=0.5)
    assert m["auc"] is None and m["sensitivity"]["estimate"] == 1.0
    assert m["sensitivity"]["high"] == 1.0 and m["sensitivity"]["low"] < 0.8  # 10 patients, 2 images each
