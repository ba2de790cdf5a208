"""Cross-source evaluation on a fake run directory: per-source AUCs, seen vs unseen, matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from covidcxr.errors import CovidCXRError
from generated_data import make_fake_run
from covidcxr.evaluate.cross_source import (
    cross_source_matrix,
    cross_source_table,
    evaluate_run,
    per_source_metrics,
    seen_unseen,
    training_sources,
)


@pytest.fixture()
def fake_run(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    run_dir = tmp_path / "run"
    return run_dir, make_fake_run(run_dir)


def test_per_source_auc_matches_sklearn_and_counts(fake_run) -> None:
    _, predictions = fake_run
    result = per_source_metrics(predictions, n_boot=200)
    assert list(result) == ["alpha", "beta", "delta", "gamma"]
    test = predictions[predictions["split"] == "test"]
    for source in ("alpha", "beta", "gamma"):
        part = test[test["source"] == source]
        m = result[source]
        assert m["auc"]["estimate"] == pytest.approx(roc_auc_score(part["target"], part["probability"]))
        assert m["n_images"] == len(part)
        assert m["n_patients"] == part["patient_id"].nunique()
        for name in ("auc", "sensitivity", "specificity", "balanced_accuracy"):
            assert m[name]["low"] <= m[name]["estimate"] <= m[name]["high"]
        assert m["note"] is None
    assert result["alpha"]["auc"]["estimate"] > 0.9
    assert result["beta"]["auc"]["estimate"] > 0.85


def test_single_class_source_gives_auc_none_with_note(fake_run) -> None:
    _, predictions = fake_run
    m = per_source_metrics(predictions, n_boot=100)["delta"]
    assert m["auc"] is None and m["sensitivity"] is None and m["balanced_accuracy"] is None
    assert "negative" in m["note"] and "AUC" in m["note"]
    part = predictions[(predictions["split"] == "test") & (predictions["source"] == "delta")]
    expected = float(np.mean(part["probability"] < 0.5))
    assert m["specificity"]["estimate"] == pytest.approx(expected)
    assert m["accuracy"]["estimate"] == pytest.approx(expected)
    assert m["specificity"]["low"] <= expected <= m["specificity"]["high"]
    assert m["n_images"] == 20 and m["n_patients"] == 20 and m["n_positive"] == 0


def test_seen_beats_unseen_with_significant_delong(fake_run) -> None:
    _, predictions = fake_run
    r = seen_unseen(predictions, ["alpha", "beta", "delta"], n_boot=200)
    assert r["seen_sources"] == ["alpha", "beta", "delta"] and r["unseen_sources"] == ["gamma"]
    assert r["seen"]["auc"]["estimate"] > r["unseen"]["auc"]["estimate"]
    gap = r["gap"]
    assert gap["auc_diff"] == pytest.approx(r["seen"]["auc"]["estimate"] - r["unseen"]["auc"]["estimate"])
    assert gap["p_value"] < 0.05 and gap["z"] > 0
    for group in ("seen", "unseen"):
        auc = r[group]["auc"]
        assert auc["low"] <= auc["estimate"] <= auc["high"]


def test_seen_unseen_empty_or_single_class_group_is_none_with_note(fake_run) -> None:
    _, predictions = fake_run
    r = seen_unseen(predictions, ["alpha", "beta", "gamma", "delta"], n_boot=50)
    assert r["unseen"] is None and r["gap"]["p_value"] is None and "unseen" in r["gap"]["note"]
    r = seen_unseen(predictions, ["alpha", "beta", "gamma"], n_boot=50)  # unseen = delta, negatives only
    assert r["unseen"]["auc"] is None and r["gap"]["auc_diff"] is None and r["gap"]["note"]


def test_training_sources_from_manifest_then_config(fake_run) -> None:
    run_dir, _ = fake_run
    assert training_sources(run_dir) == ["alpha", "beta", "delta"]
    (run_dir / "manifest.parquet").unlink()
    assert training_sources(run_dir) == ["alpha", "beta", "delta"]  # config: sources + negatives_from


def test_evaluate_run_writes_evaluation_json(fake_run) -> None:
    run_dir, predictions = fake_run
    report = evaluate_run(run_dir, n_boot=200)
    assert report["run"] == "fake" and report["training_sources"] == ["alpha", "beta", "delta"]
    assert report["threshold"] == 0.5 and report["n_boot"] == 200
    test = predictions[predictions["split"] == "test"]
    assert report["overall"]["n_images"] == len(test)
    assert report["overall"]["auc"]["estimate"] == pytest.approx(roc_auc_score(test["target"], test["probability"]))
    assert report["seen_unseen"]["gap"]["p_value"] < 0.05
    on_disk = json.loads((run_dir / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(report))


def test_missing_run_or_predictions_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CovidCXRError, match="not a run directory"):
        evaluate_run(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CovidCXRError, match="predictions.parquet"):
        evaluate_run(tmp_path / "empty")
    pd.DataFrame({"split": ["test"], "source": ["a"]}).to_parquet(tmp_path / "empty" / "predictions.parquet")
    with pytest.raises(CovidCXRError, match="missing column"):
        evaluate_run(tmp_path / "empty")


def test_cross_source_matrix_over_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_fake_run(a, seed=0, name="run-a")
    make_fake_run(b, seed=1, name="run-b")
    matrix = cross_source_matrix([a, b], n_boot=50)
    assert list(matrix.columns) == ["alpha", "beta", "delta", "gamma"]
    assert list(matrix.index) == ["run-a [alpha+beta+delta]", "run-b [alpha+beta+delta]"]
    assert np.isnan(matrix.loc["run-a [alpha+beta+delta]", "delta"])
    long = cross_source_table([a, b], n_boot=50)
    assert len(long) == 8
    row = long[(long["run"] == "run-b") & (long["test_source"] == "gamma")].iloc[0]
    assert not row["seen"] and row["auc_low"] <= row["auc"] <= row["auc_high"]
    assert row["auc"] == pytest.approx(matrix.loc["run-b [alpha+beta+delta]", "gamma"])


def test_within_source_auc_ignores_between_source_separation():
    import pandas as pd

    from covidcxr.evaluate.cross_source import source_only_auc, within_source_auc

    # source "pos" is mostly positive and scored high, "neg" mostly negative and scored low;
    # inside each source the scores are uninformative (identical per class), so pooled AUC
    # is high but within-source AUC is exactly 0.5
    rows = pd.DataFrame({
        "source": ["pos"] * 10 + ["neg"] * 10,
        "patient_id": [f"p{i}" for i in range(20)],
        "target": [1] * 8 + [0] * 2 + [1] * 2 + [0] * 8,
        "probability": [0.9] * 10 + [0.1] * 10,
    })
    within = within_source_auc(rows, n_boot=200)
    assert within["estimate"] == pytest.approx(0.5)
    assert within["sources"] == ["neg", "pos"] and within["n_images"] == 20
    # perfect ranking inside each source: 1.0
    rows["probability"] = rows["probability"] + 0.01 * rows["target"]
    assert within_source_auc(rows, n_boot=50)["estimate"] == pytest.approx(1.0)
    # the source-only baseline: training rates 0.8 / 0.2 -> AUC of a 2-level score
    train = rows.assign(target=rows["target"])
    baseline = source_only_auc(rows, train, n_boot=200)
    assert baseline["prevalence"] == {"neg": pytest.approx(0.2), "pos": pytest.approx(0.8)}
    # pairs: 10 pos x 10 neg = 100; concordant 8*8 = 64, ties (2*8 + 8*2... same source) = 32 -> (64 + 16) / 100
    assert baseline["estimate"] == pytest.approx(0.8)
    single = rows[rows["source"] == "pos"].assign(target=1)
    assert within_source_auc(single, n_boot=10) is None


def test_within_source_auc_is_split_into_seen_and_unseen_sources(fake_run) -> None:
    from covidcxr.evaluate.cross_source import evaluate_run, within_source_by_seen

    run_dir, _ = fake_run
    report = evaluate_run(run_dir, n_boot=100, write=False)
    seen, unseen = report["within_source"], report["within_source_unseen"]
    assert set(seen["sources"]) <= set(report["training_sources"])
    assert unseen["sources"] == ["gamma"] and unseen["estimate"] < seen["estimate"]
    test = pd.read_parquet(run_dir / "predictions.parquet").query("split == 'test'")
    parts = within_source_by_seen(test, ["alpha", "beta", "delta", "gamma"], n_boot=10)
    assert parts["unseen"] is None and parts["seen"]["n_images"] == len(test)
