"""Snapshot ensembles (Hall et al. 2020) and patient-grouped k-fold cross-validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidcxr.preprocess.cache import config_dir, entry_path, read_entry
from covidcxr.train import recipe_from_mapping, train_recipe
from covidcxr.train.module import load_checkpoint_model
from generated_data import tiny_train_recipe


def _quiet(_: str) -> None:
    pass


def _probabilities(checkpoint: Path, keys: list[str]) -> np.ndarray:
    model, meta = load_checkpoint_model(checkpoint)
    recipe = recipe_from_mapping(meta["recipe"])
    directory = config_dir(recipe.preprocess.cache_dir, recipe.preprocess.to_config())
    images = np.stack([read_entry(entry_path(directory, key)).image for key in keys])
    x = (torch.from_numpy(images)[:, None].half().float() - recipe.model.normalize_mean) / recipe.model.normalize_std
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.sigmoid(model(x).float()[:, 0]).numpy()


def test_snapshot_ensemble_from_the_last_epochs_averages_its_members(tmp_path: Path) -> None:
    recipe = tiny_train_recipe(tmp_path, "snap", train={"epochs": 3}, snapshots={"count": 2, "gap_epochs": 1, "start": "last"})
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    run = result.run_dir
    assert result.metrics["snapshots"]["taken"] == [{"k": 0, "epoch": 1}, {"k": 1, "epoch": 2}]
    assert (run / "checkpoints" / "snapshot-0.ckpt").is_file() and (run / "checkpoints" / "snapshot-1.ckpt").is_file()
    for k in range(2):  # members are weights only: the optimizer state lives in last.ckpt alone
        member = torch.load(run / "checkpoints" / f"snapshot-{k}.ckpt", map_location="cpu", weights_only=True)
        assert "optimizer_states" not in member and member["state_dict"] and member["covidcxr"]["config_hash"] == result.metrics["config_hash"]
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"probability", "probability_best"} <= set(predictions.columns)
    sample = predictions.head(6)
    members = [_probabilities(run / "checkpoints" / f"snapshot-{k}.ckpt", sample["cache_key"].tolist()) for k in range(2)]
    np.testing.assert_allclose(sample["probability"].to_numpy(), np.mean(members, axis=0), atol=0.02)
    assert "ensemble" in result.metrics["snapshots"] and result.metrics["snapshots"]["ensemble"]["test"]["n"] == (predictions["split"] == "test").sum()


def test_snapshots_start_when_the_metric_passes_the_threshold(tmp_path: Path) -> None:
    recipe = tiny_train_recipe(
        tmp_path, "snap-threshold", train={"epochs": 4}, snapshots={"count": 2, "gap_epochs": 2, "start": "threshold", "metric": "val_accuracy", "threshold": -1.0, "start_epoch": 1}
    )
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    assert result.metrics["snapshots"]["taken"] == [{"k": 0, "epoch": 1}, {"k": 1, "epoch": 3}]


def test_kfold_runs_every_fold_and_pools_out_of_fold_predictions(tmp_path: Path) -> None:
    recipe = tiny_train_recipe(
        tmp_path, "cv", data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "covid_vs_rest", "split": {"kind": "kfold", "folds": 3, "val_size": 0.25}}
    )
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    run = result.run_dir
    assert [f.run_dir.name for f in result.folds] == ["fold-0", "fold-1", "fold-2"]
    for k in range(3):
        assert (run / f"fold-{k}" / "checkpoints" / "best.ckpt").is_file()
        fold_manifest = pd.read_parquet(run / f"fold-{k}" / "manifest.parquet")
        assert set(fold_manifest.loc[fold_manifest["split"] == "test", "fold"]) == {k}
    pooled = pd.read_parquet(run / "predictions.parquet")
    assert pooled["image"].is_unique and len(pooled) == 90  # every image tested exactly once
    assert set(pooled["fold"]) == {0, 1, 2} and set(pooled["split"]) == {"test"}
    assert result.metrics["kind"] == "kfold" and result.metrics["out_of_fold"]["n"] == 90
    assert len(result.metrics["per_fold_test_auc"]) == 3
    again = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    assert again.status == "finished"
