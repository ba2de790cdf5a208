"""`covidcxr.rundir.RunDir`: paths, readers, the legacy threshold, weights, what a run saw (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.metrics import threshold_at_specificity
from covidcxr.models import create_model
from covidcxr.models.ensemble import SnapshotEnsemble, average_logits
from covidcxr.rundir import LEGACY_RULE, OperatingPoint, RunDir
from generated_data import make_fake_run


def test_a_run_without_an_operating_point_says_it_uses_the_legacy_half(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    point = run.operating_point()
    assert run.threshold == 0.5 and point.rule == LEGACY_RULE and point.legacy
    assert "not chosen on validation" in point.describe()
    assert run.predictions == tmp_path / "run" / "predictions.parquet" and run.audit_file == tmp_path / "run" / "audit" / "audit.json"
    assert run.name == "fake" and run.seen_sources() == ["alpha", "beta", "delta"]


def test_a_stored_operating_point_round_trips_and_bad_ones_name_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    point = OperatingPoint(threshold=0.37, rule="sensitivity", value=0.9, validation={"sensitivity": {"estimate": 0.92, "low": 0.8, "high": 0.98}, "n_images": 40, "n_patients": 21})
    run.write_operating_point(point)
    assert run.threshold == pytest.approx(0.37) and run.operating_point().validation["n_patients"] == 21
    assert "sensitivity 0.92 [0.80, 0.98]" in run.operating_point().describe() and "40 images, 21 patients" in run.operating_point().describe()
    run.operating_point_file.write_text(json.dumps({"rule": "youden", "threshold": 1.7}))
    with pytest.raises(CovidCXRError, match=r"operating_point.json: field 'threshold' must be in \[0, 1\]"):
        run.operating_point()
    run.operating_point_file.write_text("{not json")
    with pytest.raises(CovidCXRError, match="operating_point.json: the run's operating point is not readable JSON"):
        run.operating_point()


def test_which_weights_are_the_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(CovidCXRError, match="no checkpoints/best.ckpt"):
        run.weights()
    run.checkpoints.mkdir()
    for name in ("best.ckpt", "last.ckpt", "snapshot-0.ckpt", "snapshot-1.ckpt", "snapshot-10.ckpt"):
        (run.checkpoints / name).write_bytes(b"x")
    assert run.weights().checkpoints == (run.best_checkpoint,)  # snapshots alone do not make the model
    run.write_metrics({"snapshots": {"ensemble": {"test": {}}}})  # a run written before `weights`
    assert run.weights().is_ensemble and [p.name for p in run.weights().checkpoints] == ["snapshot-0.ckpt", "snapshot-1.ckpt", "snapshot-10.ckpt"]
    run.write_metrics({"weights": {"kind": "snapshot_ensemble", "checkpoints": ["snapshot-0.ckpt", "snapshot-9.ckpt"]}})
    with pytest.raises(CovidCXRError, match="snapshot-9.ckpt"):
        run.weights()
    fold_root = RunDir(tmp_path / "cv")
    (fold_root.fold(0).checkpoints).mkdir(parents=True)
    with pytest.raises(CovidCXRError, match=r"k-fold run.*fold-0"):
        fold_root.weights()


def test_what_a_run_saw_excludes_linked_images(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_manifest(pd.DataFrame({
        "image": ["a.png", "b.png", "c.png"], "source": ["s1", "s2", "s3"], "split": ["train", "val", "test"],
        "patient_id": ["p1", "p2", "p3"], "dup_group": ["g1", None, "g3"], "sha1": ["h1", "h2", "h3"],
    }))
    seen = run.seen()
    assert seen.sources == ["s1", "s2"]
    elsewhere = pd.DataFrame({"image": ["x", "y", "z", "w"], "patient_id": ["p1", "q", "q2", "q3"], "dup_group": [None, "g1", None, None], "sha1": ["k", "k2", "h2", "h3"]})
    assert seen.linked(elsewhere).tolist() == [True, True, True, False]  # patient, near-duplicate, file hash; a test image links nothing


def test_threshold_at_specificity_reaches_the_target() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    s = np.r_[rng.normal(0, 1, 200), rng.normal(1.5, 1, 200)]
    for target in (0.8, 0.9, 0.95, 1.0):
        t = threshold_at_specificity(y, s, target)
        assert np.mean(s[y == 0] < t) >= target
        # the lowest such threshold: one observed score lower breaks the target
        lower = s[s < t].max()
        assert np.mean(s[y == 0] < lower) < target


def test_the_snapshot_ensemble_network_outputs_the_members_average() -> None:
    torch.manual_seed(0)
    members = [create_model("conv8", width=8).eval() for _ in range(3)]
    ensemble = SnapshotEnsemble(members).eval()
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        assert torch.allclose(torch.sigmoid(ensemble(x)), mean, atol=1e-6)
        assert torch.allclose(ensemble.embed(x), torch.cat([m.embed(x) for m in members], dim=1), atol=1e-6)
    logits = torch.tensor([[[40.0, -3.0, 1.0]], [[-40.0, 2.0, 0.5]]])  # saturated members stay finite
    multi = torch.softmax(average_logits(logits, binary=False), dim=-1)
    assert torch.allclose(multi, torch.softmax(logits, dim=-1).mean(0), atol=1e-6)
    assert torch.isfinite(average_logits(torch.tensor([[[80.0]], [[-80.0]]]), binary=True)).all()
