"""Report benchmarks: the time to build a report (numbers, page figures, journal figure files) and the
vectorised patient bootstrap of the curves against the per-resample scikit-learn baseline."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import yaml

N_BOOT = 1000


def _fake_run(run_dir, n_patients: int = 600, seed: int = 0) -> pd.DataFrame:
    """A binary run: 3 seen sources + 1 unseen, 1-3 images per patient, a validation split."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in (("val", n_patients // 5), ("test", n_patients)):
        for p in range(count):
            source = ["alpha", "beta", "delta", "gamma"][p % 4]
            target = int(rng.random() < 0.4)
            shift = 0.3 if source == "gamma" else 1.8
            for _ in range(int(rng.integers(1, 4))):
                score = 1 / (1 + np.exp(-(rng.normal() + shift * (2 * target - 1))))
                rows.append({"split": split, "source": source, "patient_id": f"{split}-{source}-{p}", "target": target,
                             "label": "covid" if target else "normal", "probability": float(score)})
    predictions = pd.DataFrame(rows)
    predictions["predicted"] = (predictions["probability"] >= 0.5).astype(int)
    run_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    manifest = predictions[["source", "label", "patient_id", "split"]].copy()
    manifest.loc[manifest.index[: len(manifest) // 2], "split"] = "train"
    manifest = manifest[manifest["source"] != "gamma"]
    manifest.to_parquet(run_dir / "manifest.parquet", index=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "bench", "data": {"sources": ["alpha", "beta", "delta"]}}))
    return predictions


def bench_build(context) -> dict:
    """Seconds to build a one-run report of ~1200 test images (evaluation stored, n_boot 1000)."""
    from covidcxr.evaluate.cross_source import evaluate_run
    from covidcxr.report.html import build_figures
    from covidcxr.report.results import collect_results

    run_dir = context.scratch / "report-run"
    predictions = _fake_run(run_dir)
    evaluate_run(run_dir, n_boot=N_BOOT)
    start = time.perf_counter()
    results = collect_results([run_dir], n_boot=N_BOOT)
    numbers = time.perf_counter() - start
    start = time.perf_counter()
    build_figures(results)
    page = time.perf_counter() - start
    start = time.perf_counter()
    drawn = build_figures(results, context.scratch / "report_figures", prefix="report_figures/")
    with_files = time.perf_counter() - start
    test = predictions[predictions["split"] == "test"]
    return {
        "n_test_images": int(len(test)),
        "n_test_patients": int(test["patient_id"].nunique()),
        "n_boot": N_BOOT,
        "collect_seconds": round(numbers, 2),
        "page_figures_seconds": round(page, 2),
        "page_and_files_seconds": round(with_files, 2),
        "n_figure_files": 2 * sum(1 for f in drawn["exported"] if f["svg"]),
    }


def bench_curve_bootstrap(context) -> dict:
    """Patient bootstrap of AP, sensitivity at 90% specificity and ECE: vectorised vs a loop of sklearn calls."""
    from sklearn.metrics import average_precision_score, roc_curve

    from covidcxr.evaluate.calibration import calibration_with_ci, expected_calibration_error
    from covidcxr.evaluate.curves import precision_recall, sensitivity_at_specificity
    from covidcxr.evaluate.metrics import bootstrap_ci

    predictions = _fake_run(context.scratch / "curve-run", n_patients=400, seed=1)
    test = predictions[predictions["split"] == "test"]
    y, p, g = test["target"].to_numpy(), test["probability"].to_numpy(), test["patient_id"].to_numpy()

    def sens90(yy, ss):
        fpr, tpr, _ = roc_curve(yy, ss, drop_intermediate=False)
        return float(tpr[fpr <= 0.1 + 1e-12].max())

    start = time.perf_counter()
    vec = (precision_recall(y, p, g, n_boot=N_BOOT)["average_precision"], sensitivity_at_specificity(y, p, g, 0.9, n_boot=N_BOOT)["sensitivity"],
           calibration_with_ci(y, p, g, n_boot=N_BOOT)["ece"])
    vectorised = time.perf_counter() - start
    loop_boot = 200  # the baseline is slow: measured on 200 resamples and scaled
    start = time.perf_counter()
    loop = [bootstrap_ci(y, p, g, fn, n_boot=loop_boot) for fn in (average_precision_score, sens90, expected_calibration_error)]
    looped = (time.perf_counter() - start) * N_BOOT / loop_boot
    same = all(np.isclose(v["low"], bootstrap_ci(y, p, g, fn, n_boot=N_BOOT)["low"]) for v, fn in zip(vec[:1], (average_precision_score,)))
    return {
        "n_images": int(len(y)),
        "n_boot": N_BOOT,
        "vectorised_seconds": round(vectorised, 3),
        "sklearn_loop_seconds_scaled": round(looped, 2),
        "speedup": round(looped / vectorised, 1),
        "same_interval_as_loop": bool(same),
        "loop_ap_interval_200": [round(loop[0]["low"], 4), round(loop[0]["high"], 4)],
    }


BENCHMARKS = [bench_build, bench_curve_bootstrap]
