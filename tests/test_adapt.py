"""covidcxr adapt: AdaBN on an unlabelled new site and fine-tuning on N labelled images, each a new run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.adapt import ADAPTATION_FILE, adabn, adapt_run, parent_run
from covidcxr.errors import CovidCXRError
from covidcxr.train import recipe_from_mapping, train_recipe
from covidcxr.train.inference import load_run
from generated_data import tiny_train_recipe


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapt")
    recipe = tiny_train_recipe(root, "parent", train={"epochs": 2, "batch_size": 8, "checkpoint_every_n_steps": 0})
    return train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet).run_dir


@pytest.fixture(scope="module")
def new_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hospital the parent never saw, whose films are much brighter and flatter than the training sites'."""
    from covidcxr.data.synth import DEFAULT_SITES, synthesize

    folder = tmp_path_factory.mktemp("site_x")
    site = dataclasses.replace(DEFAULT_SITES[0], name="site_x", contrast=0.45, brightness=0.22, gamma=1.9, label_mix={"normal": 0.5, "covid": 0.5})
    synthesize(folder, n_images=48, sites=[site], size=64, seed=5)
    return folder


def test_adabn_changes_the_batchnorm_statistics_and_predictions_and_writes_a_run(parent: Path, new_site: Path, tmp_path: Path) -> None:
    before = load_run(parent)
    result = adapt_run(parent, new_site, out=tmp_path / "adapted", n_boot=50, say=_quiet)
    adapted = load_run(result.run_dir)
    assert parent_run(result.run_dir) == parent.resolve() and parent_run(parent) is None
    assert result.method == "adabn" and result.summary["target"] == {"data": str(new_site.resolve()), "source": "site_x", "labels_used": False}

    bn_before = {k: v for k, v in before.model.state_dict().items() if "running_mean" in k}
    bn_after = {k: v for k, v in adapted.model.state_dict().items() if "running_mean" in k}
    assert bn_before and all(not torch.allclose(bn_before[k], bn_after[k]) for k in bn_before), "every BatchNorm re-estimated"
    weights = [k for k in before.model.state_dict() if k.endswith("weight")]
    assert all(torch.equal(before.model.state_dict()[k], adapted.model.state_dict()[k]) for k in weights), "weights unchanged"

    manifest = pd.read_parquet(result.run_dir / "manifest.parquet")
    fit, test = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    assert len(fit) and len(test) and not set(fit["patient_id"]) & set(test["patient_id"]), "adaptation and test patients are disjoint"
    assert set(manifest["source"]) == {"site_x"} and set(fit["role"]) == {"adapt_unlabelled"}
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    assert sorted(predictions["image"]) == sorted(test["image"])
    images = np.random.default_rng(0).random((4, 64, 64)).astype(np.float32) * 0.3 + 0.5
    assert not np.allclose(before.predict(images), adapted.predict(images), atol=1e-4), "the predictions changed"

    summary = json.loads((result.run_dir / ADAPTATION_FILE).read_text())
    assert summary["images"] == {"adapt": len(fit), "adapt_patients": fit["patient_id"].nunique(), "test": len(test), "test_patients": test["patient_id"].nunique()}
    assert summary["before"]["site_x"]["n_images"] == summary["after"]["site_x"]["n_images"] == len(test)
    assert "delong" in summary["adaptation"] and "mcnemar" in summary["adaptation"]

    # evaluate works on it like on any run; the adapted run is never retrained over
    from covidcxr.evaluate.cross_source import evaluate_run

    report = evaluate_run(result.run_dir, n_boot=50)
    assert report["per_source"]["site_x"]["n_images"] == len(test)
    from covidcxr.audit.run import audit_run

    audit = audit_run(result.run_dir, n_boot=50, max_images=200)
    assert audit["verdict"] in ("no_skill", "shortcut", "warning", "ok") and audit["n_images"] == len(test)
    with pytest.raises(CovidCXRError, match="already there"):
        adapt_run(parent, new_site, out=tmp_path / "adapted", n_boot=50, say=_quiet)


def test_adabn_uses_a_cumulative_average_and_leaves_dropout_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(0.9), torch.nn.BatchNorm2d(2))
    images = np.concatenate([np.zeros((3, 8, 8)), np.ones((1, 8, 8))]).astype(np.float32)
    adabn(net, images, lambda x: torch.as_tensor(x)[:, None], batch_size=1)
    bn = net[2]
    with torch.no_grad():
        outputs = net[0](torch.as_tensor(images)[:, None])
    assert torch.allclose(bn.running_mean, outputs.mean(dim=(0, 2, 3)), atol=1e-5), "equal-size batches: the plain mean of all images, dropout (before it) in eval mode"
    assert bn.momentum == 0.1 and not net.training
    with pytest.raises(CovidCXRError, match="no BatchNorm"):
        adabn(torch.nn.Conv2d(1, 1, 3), images, lambda x: torch.as_tensor(x)[:, None])


def test_cli_adapt_with_labels_fine_tunes_and_records_the_parent(parent: Path, new_site: Path, tmp_path: Path) -> None:
    from covidcxr.cli import app

    out = tmp_path / "tuned"
    result = CliRunner().invoke(app, ["adapt", str(parent), "--data", str(new_site), "--labels", "12", "--out", str(out), "--n-boot", "50", "--set", "train.epochs=1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    assert parent_run(out) == parent.resolve()
    run = load_run(out)
    assert run.recipe.model.pretrained == str(parent.resolve()) and run.recipe.train.epochs == 1
    manifest = pd.read_parquet(out / "manifest.parquet")
    fit = manifest[manifest["split"].isin(["train", "val"])]
    assert len(fit) >= 12 and set(fit["class_name"]) == {"covid", "rest"}
    assert not set(fit["patient_id"]) & set(manifest.loc[manifest["split"] == "test", "patient_id"])
    bad = CliRunner().invoke(app, ["adapt", str(parent), "--data", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "not a folder" in str(bad.exception)
    bad = CliRunner().invoke(app, ["adapt", str(parent), "--data", str(new_site), "--out", str(parent.parent)])
    assert bad.exit_code != 0 and "holds something else" in str(bad.exception)


def test_the_parents_stage_one_run_comes_along_for_the_exclusions(parent: Path, tmp_path: Path) -> None:
    from covidcxr.adapt import _stage_one

    assert _stage_one(parent) is None  # trained from scratch
    child = tmp_path / "child"
    child.mkdir()
    (child / "metrics.json").write_text(json.dumps({"pretrained": {"source": str(parent / "checkpoints" / "best.ckpt"), "kind": "run"}}))
    stage_one = _stage_one(child)
    assert stage_one is not None and stage_one.run_dir == parent
