"""Coverage of the 95 % intervals of `binary_metrics_with_ci`, before and after, on clustered simulations.

Each replicate draws ``n`` positive patients and ``n (1 - prevalence) / prevalence``
negative ones, each with 1-3 images whose scores share a patient random effect
(latent ``z = sqrt(rho) u_patient + sqrt(1 - rho) e_image``, ``rho = 0.5``), scores every
image, decides ``score >= 0`` and computes every interval of
:func:`covidcxr.evaluate.metrics.binary_metrics_with_ci` (AFTER) and of the percentile
patient bootstrap it replaced (BEFORE, :func:`percentile_bootstrap_intervals`, kept here
for the comparison). Coverage is the share of replicates whose interval holds the true
value (target 93-97 % for a nominal 95 %).

The class score distributions set the true values: ``N(Phi^-1(sens), 1)`` for positives
and ``N(-Phi^-1(spec), 1)`` for negatives (a true rate of 1.0 uses a half-normal on the
right side of the threshold), so sensitivity and specificity are exact, PPV, NPV,
accuracy, F1 and balanced accuracy follow from them and the prevalence, and the AUC is
integrated numerically. *A true value of 1.0*: every replicate then observes 1.0 exactly,
and any interval whose upper limit is 1 covers it - the percentile bootstrap's [1, 1] as
well as a wide interval. Coverage there only checks that the upper limit reaches 1; the
interval's width (``mean_width``) is what tells them apart. A true DOR of infinity has no
coverage (reported as None).

Run alone: ``python benchmarks/bench_coverage.py [--replicates 300]`` prints the markdown table.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import integrate
from scipy.special import ndtr, ndtri
from scipy.stats import halfnorm, norm

#: (label, true sensitivity, true specificity); the AUC follows from the two score distributions.
SETTINGS = (
    ("AUC 0.75", float(norm.cdf(norm.ppf(0.75) / math.sqrt(2))), float(norm.cdf(norm.ppf(0.75) / math.sqrt(2)))),
    ("sens=spec=0.80", 0.80, 0.80),
    ("AUC 0.95", float(norm.cdf(norm.ppf(0.95) / math.sqrt(2))), float(norm.cdf(norm.ppf(0.95) / math.sqrt(2)))),
    ("sens=spec=0.95", 0.95, 0.95),
    ("sens=spec=0.99", 0.99, 0.99),
    ("sens=1.0 spec=0.95", 1.0, 0.95),
    ("sens=spec=1.0", 1.0, 1.0),
)
N_POSITIVE_PATIENTS = (20, 40, 100)
PREVALENCES = (0.5, 0.25)
RHO = 0.5
METRICS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "dor", "accuracy", "f1", "ppv", "npv")


@dataclass(frozen=True)
class ClassScores:
    """Score distribution of one class: P(score >= 0) = ``rate`` for positives, P(score < 0) for negatives."""

    rate: float
    positive: bool

    def _sign(self) -> float:
        return 1.0 if self.positive else -1.0

    def from_latent(self, z: np.ndarray) -> np.ndarray:
        """Scores of standard-normal latents ``z`` (monotone: quantile ``Phi(z)`` of the class distribution)."""
        if self.rate >= 1.0:  # all mass on the correct side of the threshold: a half-normal
            return self._sign() * ndtri((ndtr(self._sign() * z) + 1.0) / 2.0)
        return self._sign() * float(ndtri(self.rate)) + z

    def pdf(self, x: float) -> float:
        if self.rate >= 1.0:
            return float(halfnorm.pdf(self._sign() * x))
        return float(norm.pdf(x - self._sign() * norm.ppf(self.rate)))

    def cdf(self, x: float) -> float:
        if self.rate >= 1.0:
            return float(halfnorm.cdf(x)) if self.positive else float(1.0 - halfnorm.cdf(-x))
        return float(norm.cdf(x - self._sign() * norm.ppf(self.rate)))


def true_values(sens: float, spec: float, prevalence: float) -> dict[str, float | None]:
    """The estimands of every metric (image-level; images per patient do not depend on the class)."""
    pos, neg = ClassScores(sens, True), ClassScores(spec, False)
    auc = integrate.quad(lambda x: neg.cdf(x) * pos.pdf(x), -12, 12, points=[0.0], limit=200)[0]
    p = prevalence
    tp, fn, tn, fp = p * sens, p * (1 - sens), (1 - p) * spec, (1 - p) * (1 - spec)
    return {
        "auc": min(auc, 1.0),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "dor": None if fn == 0 or fp == 0 else (tp * tn) / (fp * fn),
        "accuracy": tp + tn,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "ppv": tp / (tp + fp),
        "npv": tn / (tn + fn),
    }


def simulate(sens: float, spec: float, n_positive: int, prevalence: float, rng: np.random.Generator, rho: float = RHO):
    """One clustered test set: labels (N,), scores (N,), patient ids (N,); threshold 0."""
    n_negative = int(round(n_positive * (1 - prevalence) / prevalence))
    labels, scores, patients = [], [], []
    for cls, n_patients, dist in ((1, n_positive, ClassScores(sens, True)), (0, n_negative, ClassScores(spec, False))):
        per = rng.integers(1, 4, n_patients)  # 1-3 images per patient
        patient = np.repeat(np.arange(n_patients), per)
        z = math.sqrt(rho) * rng.normal(size=n_patients)[patient] + math.sqrt(1 - rho) * rng.normal(size=patient.size)
        labels.append(np.full(patient.size, cls))
        scores.append(dist.from_latent(z))
        patients.append(np.char.add(f"{cls}-", patient.astype(str)))
    return np.concatenate(labels), np.concatenate(scores), np.concatenate(patients)


def percentile_bootstrap_intervals(y, s, patient_ids, threshold: float = 0.0, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """BEFORE: the percentile patient bootstrap `binary_metrics_with_ci` used until it was replaced.

    Patients drawn with replacement (all their images), every metric per resample,
    percentile interval of the defined resamples. Kept here only to measure its coverage.
    """
    from covidcxr.evaluate.metrics import _count_metrics, _group_index, _patient_weights, _percentile, _weighted_auc

    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    inverse, n_groups = _group_index(patient_ids, y.size, "patient_ids")
    w = _patient_weights(inverse, n_groups, n_boot, np.random.default_rng(seed))
    pred = (s >= threshold).astype(np.float64)
    yf = y.astype(np.float64)
    boot = _count_metrics(w @ (yf * pred), w @ ((1 - yf) * pred), w @ ((1 - yf) * (1 - pred)), w @ (yf * (1 - pred)))
    boot["auc"] = _weighted_auc(y, s, w)
    return {name: dict(zip(("low", "high"), _percentile(np.asarray(boot[name], dtype=np.float64), alpha)[:2])) for name in METRICS}


def _covers(interval: dict, truth: float) -> bool:
    low, high = interval["low"], interval["high"]
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return False  # an undefined interval covers nothing
    return low - 1e-9 <= truth <= high + 1e-9


def coverage(sens: float, spec: float, n_positive: int, prevalence: float, replicates: int, seed: int = 0, n_boot: int = 1000) -> dict:
    """Empirical coverage and mean width of every interval, before and after, in one setting."""
    from covidcxr.evaluate.metrics import binary_metrics_with_ci

    truth = true_values(sens, spec, prevalence)
    rng = np.random.default_rng(seed)
    hits = {method: {m: 0 for m in METRICS} for method in ("before", "after")}
    widths = {method: {m: [] for m in METRICS} for method in ("before", "after")}
    for r in range(replicates):
        y, s, pid = simulate(sens, spec, n_positive, prevalence, rng)
        if y.min() == y.max():
            continue
        results = {"after": binary_metrics_with_ci(y, s, pid, threshold=0.0),
                   "before": percentile_bootstrap_intervals(y, s, pid, 0.0, n_boot, seed=r)}
        for method, res in results.items():
            for m in METRICS:
                if truth[m] is None:
                    continue
                hits[method][m] += _covers(res[m], truth[m])
                if m != "dor" and math.isfinite(res[m]["high"] - res[m]["low"]):
                    widths[method][m].append(res[m]["high"] - res[m]["low"])
    out = {"truth": {k: (None if v is None else round(v, 4)) for k, v in truth.items()}, "replicates": replicates}
    for method in ("before", "after"):
        out[method] = {
            "coverage": {m: (None if truth[m] is None else round(hits[method][m] / replicates, 3)) for m in METRICS},
            "mean_width": {m: (round(float(np.mean(w)), 3) if w else None) for m, w in widths[method].items()},
        }
    return out


def markdown_table(settings: dict) -> str:
    """One row per setting, one column per metric, each cell 'before → after' coverage in %."""
    head = "| setting | n pos patients | prevalence | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for key, res in settings.items():
        label, n, prev = key.split(" | ")
        cells = []
        for m in METRICS:
            before, after = res["before"]["coverage"][m], res["after"]["coverage"][m]
            cells.append("n/a (∞)" if after is None else f"{100 * before:.0f} → **{100 * after:.0f}**")
        lines.append(f"| {label} | {n} | {prev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def width_table(settings: dict, metrics: tuple[str, ...] = ("auc", "sensitivity", "specificity", "ppv")) -> str:
    """Mean interval width before → after where a true value is 1.0 (coverage cannot tell them apart there)."""
    lines = ["| setting | n pos patients | prevalence | " + " | ".join(f"{m} width" for m in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    for key, res in settings.items():
        if "1.0" not in key.split(" | ")[0]:
            continue
        cells = [f"{res['before']['mean_width'][m]:.3f} → **{res['after']['mean_width'][m]:.3f}**" for m in metrics]
        lines.append("| " + " | ".join(key.split(" | ")) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_intervals(context=None, replicates: int = 200, n_boot: int = 500) -> dict:
    """Coverage of every interval in every setting (settings × n × prevalence), before → after."""
    start, cpu_start = time.perf_counter(), time.process_time()
    settings = {}
    for label, sens, spec in SETTINGS:
        for n in N_POSITIVE_PATIENTS:
            for prev in PREVALENCES:
                key = f"{label} | {n} | {prev}"
                settings[key] = coverage(sens, spec, n, prev, replicates, seed=n, n_boot=n_boot)
                print(f"[coverage] {key}: after {settings[key]['after']['coverage']}", file=sys.stderr, flush=True)
    after = [c for res in settings.values() for c in res["after"]["coverage"].values() if c is not None]
    before = [c for res in settings.values() for c in res["before"]["coverage"].values() if c is not None]
    return {
        "replicates_per_setting": replicates,
        "bootstrap_resamples_before": n_boot,
        "rho": RHO,
        "min_coverage_before": min(before),
        "min_coverage_after": min(after),
        "share_after_in_93_97": round(float(np.mean([0.93 <= c <= 0.97 for c in after])), 3),
        "share_after_at_least_93": round(float(np.mean([c >= 0.93 for c in after])), 3),
        "settings": settings,
        "table_markdown": markdown_table(settings),
        "width_table_markdown": width_table(settings),
        "simulation_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }


# ------------------------------------------------- the paired AUC difference (leave-one-source-out table)

#: (label, AUC of the method, AUC of the baseline): a null and two true differences.
PAIRED_SETTINGS = (("equal AUCs 0.75", 0.75, 0.75), ("0.80 vs 0.70", 0.80, 0.70), ("0.95 vs 0.90", 0.95, 0.90))
PAIRED_PATIENTS = (20, 50, 150)  # positive patients (as many negative ones)
PAIRED_IMAGES = (3, 6)  # images per patient: uniform 1..k
PAIRED_TEST_CORRELATION = 0.6  # between the two methods' latent scores of one image (same images, related models)


def simulate_paired(auc_a: float, auc_b: float, n_patients: int, max_images: int, rng: np.random.Generator, rho: float = RHO):
    """Two methods scored on one clustered test set: labels, scores a and b, patient ids.

    Score of method t on an image: ``mu_t * y + z_t`` with a standard-normal latent ``z_t``
    shared by the patient's images (``sqrt(rho)`` of it) and correlated between the methods
    (`PAIRED_TEST_CORRELATION`), so ``AUC_t = Phi(mu_t / sqrt 2)`` exactly.
    """
    c = PAIRED_TEST_CORRELATION
    labels, a, b, patients = [], [], [], []
    for cls in (1, 0):
        per = rng.integers(1, max_images + 1, n_patients)
        patient = np.repeat(np.arange(n_patients), per)
        u = rng.normal(size=(2, n_patients))
        e = rng.normal(size=(2, patient.size))
        za = math.sqrt(rho) * u[0][patient] + math.sqrt(1 - rho) * e[0]
        zb = math.sqrt(rho) * (c * u[0] + math.sqrt(1 - c * c) * u[1])[patient] + math.sqrt(1 - rho) * (c * e[0] + math.sqrt(1 - c * c) * e[1])
        labels.append(np.full(patient.size, cls))
        a.append(cls * math.sqrt(2) * float(ndtri(auc_a)) + za)
        b.append(cls * math.sqrt(2) * float(ndtri(auc_b)) + zb)
        patients.append(np.char.add(f"{cls}-", patient.astype(str)))
    return np.concatenate(labels), np.concatenate(a), np.concatenate(b), np.concatenate(patients)


def paired_coverage(auc_a: float, auc_b: float, n_patients: int, max_images: int, replicates: int, seed: int = 0, n_boot: int = 500) -> dict:
    """Coverage and mean width of three 95 % intervals of AUC_a − AUC_b: DeLong (images independent), Obuchowski (clustered), paired patient bootstrap."""
    from covidcxr.evaluate.metrics import _group_index, _patient_weights, _percentile, _weighted_auc
    from covidcxr.experiments.table import paired_auc_difference

    truth = auc_a - auc_b
    rng = np.random.default_rng(seed)
    hits = {"delong": 0, "obuchowski_clustered": 0, "patient_bootstrap": 0}
    widths: dict[str, list[float]] = {k: [] for k in hits}
    for r in range(replicates):
        y, a, b, pid = simulate_paired(auc_a, auc_b, n_patients, max_images, rng)
        intervals = {
            "delong": paired_auc_difference(y, a, b),
            "obuchowski_clustered": paired_auc_difference(y, a, b, pid),
        }
        inverse, groups = _group_index(pid, y.size, "patients")
        weights = _patient_weights(inverse, groups, n_boot, np.random.default_rng(r))
        low, high, _ = _percentile(_weighted_auc(y, a, weights) - _weighted_auc(y, b, weights), 0.05)
        intervals["patient_bootstrap"] = {"delta_low": low, "delta_high": high}
        for name, interval in intervals.items():
            hits[name] += _covers({"low": interval["delta_low"], "high": interval["delta_high"]}, truth)
            widths[name].append(interval["delta_high"] - interval["delta_low"])
    return {
        "truth": round(truth, 4),
        "coverage": {k: round(v / replicates, 3) for k, v in hits.items()},
        "mean_width": {k: round(float(np.mean(v)), 4) for k, v in widths.items()},
    }


def bench_paired_difference(context=None, replicates: int = 300, n_boot: int = 500) -> dict:
    """Coverage of the paired AUC-difference interval of `covidcxr.experiments.table.paired_auc_difference`, clustered vs not."""
    start = time.perf_counter()
    settings = {}
    for label, auc_a, auc_b in PAIRED_SETTINGS:
        for n in PAIRED_PATIENTS:
            for k in PAIRED_IMAGES:
                key = f"{label} | {n}+{n} patients | 1-{k} images"
                settings[key] = paired_coverage(auc_a, auc_b, n, k, replicates, seed=n * 10 + k, n_boot=n_boot)
                print(f"[coverage] paired {key}: {settings[key]['coverage']}", file=sys.stderr, flush=True)
    lines = ["| setting | patients | images per patient | DeLong (independent) | Obuchowski (clustered) | patient bootstrap |", "|---|---|---|---|---|---|"]
    for key, res in settings.items():
        c, w = res["coverage"], res["mean_width"]
        lines.append("| " + " | ".join(key.split(" | ")) + " | " + " | ".join(f"{100 * c[m]:.1f} % (±{w[m] / 2:.3f})" for m in ("delong", "obuchowski_clustered", "patient_bootstrap")) + " |")
    by_method = {m: [res["coverage"][m] for res in settings.values()] for m in ("delong", "obuchowski_clustered", "patient_bootstrap")}
    return {
        "replicates_per_setting": replicates,
        "rho": RHO,
        "test_correlation": PAIRED_TEST_CORRELATION,
        "min_coverage": {m: min(v) for m, v in by_method.items()},
        "mean_coverage": {m: round(float(np.mean(v)), 3) for m, v in by_method.items()},
        "settings": settings,
        "table_markdown": "\n".join(lines),
        "seconds": round(time.perf_counter() - start, 1),
    }


BENCHMARKS = [bench_intervals, bench_paired_difference]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args()
    figures = bench_intervals(None, args.replicates, args.n_boot)
    print(figures["table_markdown"], figures["width_table_markdown"], sep="\n\n")
