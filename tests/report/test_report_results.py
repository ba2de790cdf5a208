"""The report's numbers: ROC bands from the evaluation's bootstrap, composition counts,
findings without an audit, stale evaluations, multi-class runs, paired comparisons, JSON."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, roc_curve

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.cross_source import evaluate_run
from covidcxr.evaluate.metrics import roc_with_band
from covidcxr.evaluate.stats import delong_test, mcnemar_test
from covidcxr.report.results import (
    collect_results,
    data_composition,
    load_run_inputs,
    multiclass_summary,
    write_results_json,
)
from generated_data import make_fake_run
from report_helpers import SHORTCUT_TEXT, make_multiclass_run, write_fake_audit

N_BOOT = 200


@pytest.fixture()
def fake_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    return run_dir


def test_roc_band_comes_from_the_same_bootstrap_as_the_auc_ci(fake_run: Path) -> None:
    evaluation = evaluate_run(fake_run, n_boot=N_BOOT, seed=3, write=False)
    predictions = pd.read_parquet(fake_run / "predictions.parquet")
    rows = predictions[(predictions["split"] == "test") & (predictions["source"] == "alpha")]
    roc = roc_with_band(rows["target"], rows["probability"], rows["patient_id"].astype(str), n_boot=N_BOOT, seed=3)
    auc = evaluation["per_source"]["alpha"]["auc"]
    # same seed, same resamples: the band's AUC interval is the evaluation's AUC CI
    assert roc["auc_ci"]["low"] == pytest.approx(auc["low"]) and roc["auc_ci"]["high"] == pytest.approx(auc["high"])
    fpr, tpr, _ = roc_curve(rows["target"], rows["probability"])
    assert roc["fpr"] == pytest.approx(fpr.tolist()) and roc["tpr"] == pytest.approx(tpr.tolist())
    low, high = np.array(roc["band"]["tpr_low"]), np.array(roc["band"]["tpr_high"])
    assert np.all(low <= high) and np.all(np.diff(low) >= -1e-12) and np.all(np.diff(high) >= -1e-12)
    # the empirical step curve lies inside its own 95% band at nearly every false-positive rate
    grid = np.array(roc["band"]["fpr"])
    observed = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    assert np.mean((observed >= low - 1e-9) & (observed <= high + 1e-9)) >= 0.9
    assert roc["n_boot_valid"] == N_BOOT and high[-1] == 1.0


def test_roc_band_of_perfectly_separated_scores_is_one() -> None:
    y = np.array([0, 0, 0, 1, 1, 1] * 5)
    s = y * 0.8 + np.linspace(0, 0.1, y.size)
    roc = roc_with_band(y, s, [f"p{i}" for i in range(y.size)], n_boot=100)
    assert roc["band"]["tpr_low"] == pytest.approx([1.0] * 101)
    # the AUC interval keeps its width at AUC 1 (15 + 15 patients), see evaluate.metrics.auc_ci
    assert roc["auc_ci"]["high"] == 1.0 and 0.8 < roc["auc_ci"]["low"] < 0.97


def test_data_composition_counts_images_and_patients() -> None:
    manifest = pd.DataFrame({
        "source": ["a", "a", "a", "a", "b", "b", "b"],
        "label": ["covid", "covid", "covid", "normal", "normal", "normal", "pneumonia"],
        "split": ["train", "train", "test", "train", "val", "test", "test"],
        "patient_id": ["a1", "a1", "a2", "a3", "b1", "b2", "b2"],
        "class_name": ["covid", "covid", "covid", "rest", "rest", "rest", "rest"],
    })
    excluded = pd.DataFrame({"image": ["x", "y", "z"], "split": ["train", "train", "test"], "source": ["a", "a", "b"], "reason": ["blank", "blank", "too small"]})
    c = data_composition(manifest, excluded)
    assert c["splits"] == ["train", "val", "test"]
    row = next(r for r in c["rows"] if r["source"] == "a" and r["label"] == "covid")
    assert row["train"] == {"images": 2, "patients": 1} and row["test"] == {"images": 1, "patients": 1} and row["val"] == {"images": 0, "patients": 0}
    assert row["total"] == {"images": 3, "patients": 2}
    assert c["totals"]["test"] == {"images": 3, "patients": 2} and c["totals"]["total"] == {"images": 7, "patients": 5}
    assert {"class": "rest", "train": 1, "val": 1, "test": 2, "total": 4} in c["classes"]
    assert c["excluded"]["count"] == 3
    assert {"source": "a", "split": "train", "reason": "blank", "images": 2} in c["excluded"]["rows"]
    assert data_composition(None)["available"] is False


def test_kfold_run_composition_pools_the_folds_test_rows(tmp_path: Path) -> None:
    run_dir = tmp_path / "kfold"
    make_fake_run(run_dir)
    (run_dir / "manifest.parquet").unlink()
    for k in range(2):
        fold = pd.DataFrame({
            "source": ["a", "a", "b", "b"], "label": ["covid", "normal", "normal", "covid"], "patient_id": ["p1", "p2", "p3", "p4"],
            "split": ["test", "train", "train", "test"] if k == 0 else ["train", "test", "test", "train"],
        })
        (run_dir / f"fold-{k}").mkdir()
        fold.to_parquet(run_dir / f"fold-{k}" / "manifest.parquet", index=False)
    inputs = load_run_inputs(run_dir, n_boot=50)
    composition = data_composition(inputs.manifest)
    assert composition["splits"] == ["fold-0", "fold-1"] and composition["totals"]["total"] == {"images": 4, "patients": 4}
    assert "fold manifests" in inputs.manifest_origin


def test_unaudited_run_is_flagged_from_the_evaluation_alone(fake_run: Path) -> None:
    results = collect_results([fake_run], n_boot=N_BOOT)
    run = results["runs"][0]
    assert run["audit"]["status"] == "not_audited" and run["audit"]["command"] == f"covidcxr audit {fake_run}"
    # gamma is unseen and scored at random: domain shift, reported as a warning with its own numbers (not a source shortcut)
    gap = next(f for f in run["findings"] if f["id"] == "unseen_sources")
    assert gap["severity"] == "warning" and gap["origin"] == "evaluation" and "domain shift" in gap["text"]
    assert run["verdict"]["level"] == "not_audited"
    reference = evaluate_run(fake_run, n_boot=N_BOOT, write=False)
    assert run["evaluation"]["per_source"] == reference["per_source"]
    assert run["headline"]["auc"] == reference["overall"]["auc"]
    names = [c["name"] for c in run["roc"]]
    assert names == ["all test images", "seen sources", "unseen sources", "alpha", "beta", "delta", "gamma"]
    delta = run["roc"][names.index("delta")]
    assert "one class" in delta["note"] and delta["n_negative"] == 20
    assert "evaluation.json is missing" in run["provenance"]["evaluation"]


def test_audited_run_takes_the_audits_findings(fake_run: Path) -> None:
    write_fake_audit(fake_run)
    run = collect_results([fake_run], n_boot=N_BOOT)["runs"][0]
    assert run["audit"]["status"] == "audited"
    assert [f["severity"] for f in run["findings"]] == ["shortcut", "warning", "ok"]
    assert run["findings"][0]["text"] == SHORTCUT_TEXT and run["findings"][0]["origin"] == "audit"
    assert [f["file"] for f in run["audit"]["figures"]] == ["gallery.png", "embedding.png"]


def test_stored_evaluation_is_used_unless_stale(fake_run: Path) -> None:
    evaluate_run(fake_run, n_boot=50, seed=1)
    inputs = load_run_inputs(fake_run)
    assert inputs.evaluation_origin.startswith("evaluation.json") and inputs.evaluation["n_boot"] == 50
    assert "recomputed" not in inputs.evaluation_origin
    inputs = load_run_inputs(fake_run, threshold=0.3, n_boot=60)
    assert "threshold" in inputs.evaluation_origin and inputs.evaluation["threshold"] == 0.3
    stat = (fake_run / "evaluation.json").stat()
    os.utime(fake_run / "predictions.parquet", (stat.st_atime, stat.st_mtime + 10))
    inputs = load_run_inputs(fake_run, n_boot=60)
    assert "older than predictions.parquet" in inputs.evaluation_origin and inputs.evaluation["n_boot"] == 60
    stored = json.loads((fake_run / "evaluation.json").read_text())
    del stored["within_source"]
    (fake_run / "evaluation.json").write_text(json.dumps(stored))
    os.utime(fake_run / "predictions.parquet", (stat.st_atime, stat.st_mtime - 100))
    assert "lacks within_source" in load_run_inputs(fake_run, n_boot=60).evaluation_origin


def test_bad_run_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(CovidCXRError, match="not a run directory"):
        load_run_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CovidCXRError, match="no predictions.parquet"):
        load_run_inputs(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "predictions.parquet").write_text("not parquet")
    with pytest.raises(CovidCXRError, match="unreadable parquet"):
        load_run_inputs(tmp_path / "bad")
    with pytest.raises(CovidCXRError, match="at least one run"):
        collect_results([])


def test_multiclass_run_gets_confusion_matrix_and_accuracy(tmp_path: Path) -> None:
    frame = make_multiclass_run(tmp_path / "three")
    summary = multiclass_summary(frame, ["normal", "pneumonia", "covid"], n_boot=N_BOOT)
    test = frame[frame["split"] == "test"]
    predicted = test[["prob_normal", "prob_pneumonia", "prob_covid"]].to_numpy().argmax(axis=1)
    expected = confusion_matrix(test["target"], predicted, labels=[0, 1, 2])
    assert summary["confusion"] == expected.tolist()
    accuracy = float(np.trace(expected) / expected.sum())
    assert summary["accuracy"]["estimate"] == pytest.approx(accuracy) == summary["three_class_accuracy"]
    assert summary["accuracy"]["low"] <= accuracy <= summary["accuracy"]["high"]
    merged = (expected[2, 2] + expected[:2, :2].sum()) / expected.sum()
    assert summary["two_class_accuracy"] == pytest.approx(merged)
    assert summary["recall"]["covid"] == pytest.approx(expected[2, 2] / expected[2].sum())
    run = collect_results([tmp_path / "three"])["runs"][0]
    assert run["binary"] is False and run["evaluation"] is None and run["roc"] == []
    assert run["multiclass"]["confusion"] == expected.tolist() and "binary runs" in run["multiclass"]["unsupported"]


def test_paired_comparison_of_two_runs_on_the_same_images(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "a", seed=0, name="run-a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    predictions = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
    predictions["image"] = [f"img{i}.png" for i in range(len(predictions))]
    rng = np.random.default_rng(5)
    b = predictions.copy()
    b["probability"] = np.clip(b["probability"] + rng.normal(0, 0.3, len(b)), 0, 1)
    b["run"] = "run-b"
    predictions.to_parquet(tmp_path / "a" / "predictions.parquet", index=False)
    b.to_parquet(tmp_path / "b" / "predictions.parquet", index=False)
    (tmp_path / "b" / "config.yaml").write_text((tmp_path / "a" / "config.yaml").read_text().replace("run-a", "run-b"))
    results = collect_results([tmp_path / "a", tmp_path / "b"], n_boot=50)
    (comparison,) = results["comparisons"]
    test_a = predictions[predictions["split"] == "test"]
    test_b = b[b["split"] == "test"]
    assert comparison["run_a"] == "run-a" and comparison["run_b"] == "run-b" and comparison["n_common"] == len(test_a)
    expected = delong_test(test_a["target"], test_a["probability"], test_b["probability"])
    assert comparison["delong"]["p_value"] == pytest.approx(expected["p_value"])
    mc = mcnemar_test(test_a["target"], (test_a["probability"] >= 0.5).astype(int), (test_b["probability"] >= 0.5).astype(int))
    assert (comparison["mcnemar"]["b"], comparison["mcnemar"]["c"]) == (mc["b"], mc["c"])
    assert results["cross_source"]["rows"] == ["run-a [alpha+beta+delta]", "run-b [alpha+beta+delta]"]


def test_results_json_round_trips_without_nan(fake_run: Path, tmp_path: Path) -> None:
    results = collect_results([fake_run], n_boot=N_BOOT)
    path = write_results_json(results, tmp_path / "out" / "results.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == json.loads(json.dumps(results))
    assert loaded["runs"][0]["evaluation"]["per_source"]["delta"]["auc"] is None
    assert loaded["schema"] == "covidcxr-report/1" and "NOT FOR MEDICAL USE" in loaded["medical_use"]
    assert not math.isnan(loaded["runs"][0]["headline"]["auc"]["estimate"])
