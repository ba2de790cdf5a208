"""The run directory's answers, measured: does a threshold chosen on validation keep its promise, and what does the deployed ensemble cost?

* ``rundir.operating_point_transfer``: a target sensitivity (or specificity) reached on a small
  validation split is not reached on new images every time. Clustered binormal scores (patients
  with 1-3 correlated images, true AUC ~0.87); the threshold is chosen on validation with the
  same code as training (`covidcxr.train.operating_point.threshold_for_rule`), and its true
  sensitivity / specificity are computed exactly from the score distributions. Reported per
  validation size: the mean true value and the share of runs that fall short of the target by
  more than 0.05 — the number behind "chosen on validation" in `operating_point.json`.
* ``rundir.ensemble_inference``: images per second of `covidcxr.train.inference.LoadedRun.predict`
  for one ResNet-18 at 224 px and for a 3-snapshot `SnapshotEnsemble` (the deployed model of a
  Hall-style run), same inputs, one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

SEPARATION = 1.6  # binormal: negatives N(0, 1), positives N(1.6, 1) -> AUC = Phi(1.6 / sqrt 2) ~ 0.87
REPEATS = 300


def _clustered_scores(rng: np.random.Generator, n_patients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half positive patients; 1-3 images each sharing a patient effect (intra-class correlation 0.5)."""
    ys, scores, patients = [], [], []
    for p in range(n_patients):
        y = p % 2
        effect = rng.normal(0.0, np.sqrt(0.5))
        for _ in range(int(rng.integers(1, 4))):
            ys.append(y)
            scores.append(SEPARATION * y + effect + rng.normal(0.0, np.sqrt(0.5)))
            patients.append(f"p{p}")
    return np.array(ys), np.array(scores), np.array(patients)


def bench_operating_point_transfer(context) -> dict:
    from covidcxr.train.operating_point import threshold_for_rule
    from covidcxr.train.recipe import OperatingPointSection

    rng = np.random.default_rng(0)
    out: dict = {"repeats": REPEATS, "true_auc": round(float(norm.cdf(SEPARATION / np.sqrt(2))), 3)}
    for rule, target in (("sensitivity", 0.9), ("specificity", 0.9)):
        spec = OperatingPointSection(rule=rule, value=target)
        for n_patients in (20, 60, 200):
            achieved = []
            for _ in range(REPEATS):
                y, s, patients = _clustered_scores(rng, n_patients)
                t = threshold_for_rule(spec, y, s)
                true_value = 1 - norm.cdf(t, loc=SEPARATION) if rule == "sensitivity" else norm.cdf(t)
                achieved.append(true_value)
            achieved = np.array(achieved)
            key = f"{rule}_{target}_val_{n_patients}_patients"
            out[key] = {
                "mean_true": round(float(achieved.mean()), 3),
                "p05_true": round(float(np.percentile(achieved, 5)), 3),
                "share_short_by_over_0.05": round(float(np.mean(achieved < target - 0.05)), 3),
            }
    return out


def bench_ensemble_inference(context) -> dict:
    import torch

    from covidcxr.models import create_model
    from covidcxr.models.ensemble import SnapshotEnsemble

    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.rand(16, 1, 224, 224)
    single = create_model("resnet18", num_classes=1).eval()
    ensemble = SnapshotEnsemble([single] + [create_model("resnet18", num_classes=1).eval() for _ in range(2)]).eval()
    out = {"images": int(len(images)), "size": 224, "threads": 1}
    for name, model in (("single", single), ("ensemble_of_3", ensemble)):
        with torch.inference_mode():
            model(images[:2])
            start = time.perf_counter()
            model(images)
            seconds = time.perf_counter() - start
        out[f"{name}_images_per_second"] = round(len(images) / seconds, 2)
    out["ensemble_cost_ratio"] = round(out["single_images_per_second"] / out["ensemble_of_3_images_per_second"], 2)
    return out


BENCHMARKS = [bench_operating_point_transfer, bench_ensemble_inference]

if __name__ == "__main__":  # pragma: no cover
    print(bench_operating_point_transfer(Path(".")))
