"""End-to-end tiny runs: the run directory, provenance, resume (epoch end and mid-epoch), refusal."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from covidcxr.train import RunConflictError, load_recipe, read_provenance, recipe_from_mapping, train_recipe
from covidcxr.train.callbacks import AtomicCheckpointIO
from covidcxr.train.data import manifest_hash, split_ids
from covidcxr.train.module import load_checkpoint_model
from generated_data import tiny_train_recipe


def _quiet(_: str) -> None:
    pass


def _train(recipe: dict, **kwargs):
    return train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet, **kwargs)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_run")


@pytest.fixture(scope="module")
def tiny_run(root: Path):
    return _train(tiny_train_recipe(root, "tiny", train={"epochs": 2, "checkpoint_every_n_steps": 2}))


def test_run_directory_is_complete(tiny_run) -> None:
    run = tiny_run.run_dir
    assert tiny_run.status == "trained"
    for name in ("config.yaml", "manifest.parquet", "predictions.parquet", "metrics.json", "train_log.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp*")), "no temporary file is left behind"
    config = load_recipe(run / "config.yaml")
    assert config.config_hash() == tiny_run.metrics["config_hash"]
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == pytest.approx(0.003)
    log = pd.read_csv(run / "train_log.csv")
    assert log["epoch"].tolist() == [0, 1] and log["val_auc"].notna().all()
    metrics = tiny_run.metrics
    assert metrics["status"] == "complete" and metrics["epochs_trained"] == 2
    assert metrics["val"]["auc"] is not None and metrics["test"]["auc"] is not None
    assert metrics["engine"]["precision"] in ("bf16-mixed", "32-true")


def test_predictions_are_val_and_test_images_disjoint_from_train(tiny_run) -> None:
    run = tiny_run.run_dir
    manifest = pd.read_parquet(run / "manifest.parquet")
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"split", "fold", "target", "class_name", "role", "cache_key", "file_sha1"} <= set(manifest.columns)
    expected = manifest[manifest["split"].isin(["val", "test"])]
    assert sorted(predictions["image"]) == sorted(expected["image"])
    assert set(predictions["split"]) == {"val", "test"}
    for column in ("run", "split", "source", "patient_id", "label", "target", "probability"):
        assert column in predictions.columns, column
    assert predictions["probability"].between(0, 1).all()
    train_patients = set(manifest.loc[manifest["split"] == "train", "patient_id"])
    assert train_patients and not train_patients & set(predictions["patient_id"])
    assert not set(predictions.loc[predictions["split"] == "val", "patient_id"]) & set(predictions.loc[predictions["split"] == "test", "patient_id"])


def test_checkpoint_provenance_and_weights_only_loading(tiny_run) -> None:
    run = tiny_run.run_dir
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        info = checkpoint["covidcxr"]
        for key in ("config_hash", "manifest_hash", "split_ids", "code_version", "classes", "task", "created"):
            assert key in info, key
        assert info["code_version"]["covidcxr"] and "git_commit" in info["code_version"]
        assert info["classes"] == ["rest", "covid"]
    records = pd.read_parquet(run / "manifest.parquet")
    assert info["manifest_hash"] == manifest_hash(records) == tiny_run.metrics["manifest_hash"]
    assert info["split_ids"] == split_ids(records)
    # the network rebuilds from the checkpoint alone and reproduces the run's predictions
    model, meta = load_checkpoint_model(run / "checkpoints" / "best.ckpt")
    assert meta["task"] == "covid_vs_rest" and meta["recipe"]["model"]["name"] == "conv8"


def test_finished_run_is_not_retrained(tiny_run) -> None:
    last = tiny_run.run_dir / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    again = _train(tiny_train_recipe(tiny_run.run_dir.parent.parent, "tiny", train={"epochs": 2, "checkpoint_every_n_steps": 2}))
    assert again.status == "finished"
    assert last.stat().st_mtime_ns == before


def test_resume_after_an_epoch_continues_the_global_step(root: Path) -> None:
    first = _train(tiny_train_recipe(root, "resume", train={"epochs": 1}))
    steps = first.metrics["global_step"]
    assert steps > 0 and read_provenance(first.run_dir / "checkpoints" / "last.ckpt")["global_step"] == steps
    second = _train(tiny_train_recipe(root, "resume", train={"epochs": 2}))
    assert second.status == "resumed"
    assert second.metrics["global_step"] == 2 * steps  # continued, not restarted
    log = pd.read_csv(second.run_dir / "train_log.csv")
    assert log["epoch"].tolist() == [0, 1] and log["global_step"].tolist() == [steps, 2 * steps]


class _Crash(Exception):
    pass


class _CrashAt(L.Callback):
    """Raise inside a training batch, as a kill would stop the process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Crash(f"simulated crash at step {self.step}")


def test_mid_epoch_crash_resumes_exactly_where_it_stopped(root: Path) -> None:
    settings = dict(
        data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "covid_vs_rest", "balance": "none", "split": {"test_size": 0.3, "val_size": 0.25}},
        train={"epochs": 2, "batch_size": 8, "checkpoint_every_n_steps": 1},
        augmentation={"rotation_degrees": 5, "translation": 0.05, "hflip": 0.5},
    )
    straight = _train(tiny_train_recipe(root, "straight", **settings))
    per_epoch = straight.metrics["global_step"] // 2
    assert per_epoch >= 4
    crash_step = per_epoch + 3  # in the middle of the second epoch
    recipe = tiny_train_recipe(root, "crashed", **settings)
    with pytest.raises(_Crash):
        _train(recipe, extra_callbacks=[_CrashAt(crash_step)])
    saved = read_provenance(root / "runs" / "crashed" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == crash_step - 1  # the step checkpoint before the crash
    resumed = _train(recipe)
    assert resumed.status == "resumed"
    assert resumed.metrics["global_step"] == straight.metrics["global_step"]
    # same sampler order, same augmentations, same optimizer state: the same weights
    a = torch.load(straight.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = pd.read_csv(resumed.run_dir / "train_log.csv")
    reference = pd.read_csv(straight.run_dir / "train_log.csv")
    assert log["epoch"].tolist() == [0, 1]
    # the interrupted epoch's loss covers the whole epoch (sums travel in the checkpoint)
    np.testing.assert_allclose(log["train_loss"], reference["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(log["val_auc"], reference["val_auc"], rtol=1e-9)
    assert (log["epoch_seconds"] < 600).all()


def test_another_experiment_in_the_run_dir_is_refused_unless_force_new(root: Path) -> None:
    _train(tiny_train_recipe(root, "conflict"))
    changed = tiny_train_recipe(root, "conflict", optimizer={"name": "sgd", "lr": 0.01})
    with pytest.raises(RunConflictError, match="another experiment"):
        _train(changed)
    result = _train(changed, force_new=True)
    assert result.status == "trained"
    assert list(root.glob("runs/conflict.replaced-*")), "the old run was moved aside, not deleted"


def test_atomic_checkpoint_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, target)
    good = target.read_bytes()

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, target)
    assert target.read_bytes() == good
    assert sorted(os.listdir(target.parent)) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["epoch"] == 1


def test_predictions_match_the_rebuilt_best_model(tiny_run) -> None:
    from covidcxr.preprocess.cache import read_entry

    run = tiny_run.run_dir
    model, meta = load_checkpoint_model(run / "checkpoints" / "best.ckpt")
    recipe = recipe_from_mapping(meta["recipe"])
    predictions = pd.read_parquet(run / "predictions.parquet").head(4)
    cache = Path(recipe.preprocess.cache_dir)
    from covidcxr.preprocess.cache import config_dir, entry_path

    directory = config_dir(cache, recipe.preprocess.to_config())
    images = np.stack([read_entry(entry_path(directory, key)).image for key in predictions["cache_key"]])
    x = (torch.from_numpy(images)[:, None].half().float() - recipe.model.normalize_mean) / recipe.model.normalize_std
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=tiny_run.metrics["engine"]["precision"] == "bf16-mixed"):
        probability = torch.sigmoid(model(x).float()[:, 0]).numpy()
    np.testing.assert_allclose(probability, predictions["probability"].to_numpy(), atol=0.02)


def test_three_class_run_with_class_weights_writes_per_class_probabilities(root: Path) -> None:
    recipe = tiny_train_recipe(
        root,
        "three",
        data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "three_class", "balance": "none", "split": {"test_size": 0.3, "val_size": 0.25}},
        train={"epochs": 1, "balancing": "class_weights"},
    )
    result = _train(recipe)
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    columns = ["prob_normal", "prob_pneumonia", "prob_covid"]
    assert set(columns) <= set(predictions.columns) and "predicted_class" in predictions.columns
    np.testing.assert_allclose(predictions[columns].sum(axis=1), 1.0, atol=1e-5)
    assert set(predictions["class_name"]) <= {"normal", "pneumonia", "covid"}
    assert result.metrics["classes"] == ["normal", "pneumonia", "covid"] and result.metrics["test"]["auc"] is not None
    module_weights = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["covidcxr"]["class_counts_train"]
    assert len(module_weights) == 3
