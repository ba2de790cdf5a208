"""Training data: task selection, composition, the epoch sampler, the resumable loader, rigid augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.data.manifest import make_manifest
from covidcxr.errors import CovidCXRError
from covidcxr.train.data import EpochSampler, ResumableDataLoader, build_records, compose_records, select_task, split_records
from covidcxr.train.module import protect_degenerate_convs, rigid_augment, rigid_warp
from covidcxr.train.recipe import recipe_from_mapping
from generated_data import tiny_train_recipe


def _manifest(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """(source, label, finding, patients) -> a manifest with one image per patient (files need not exist)."""
    records = []
    for source, label, finding, patients in rows:
        for p in range(patients):
            records.append({"image": f"/nowhere/{source}/{label}_{finding}_{p}.png", "source": source, "label": label, "finding": finding, "patient_id": f"{source}:{label}{finding}{p}", "sha1": None})
    return make_manifest(records)


def _recipe(**data) -> object:
    return recipe_from_mapping({"data": {"collection": "/nowhere", **data}})


def test_select_task_maps_labels_and_kermany_findings() -> None:
    manifest = _manifest([
        ("kermany", "normal", "normal", 4),
        ("kermany", "pneumonia", "bacterial pneumonia", 3),
        ("kermany", "pneumonia", "viral pneumonia", 2),
        ("cohen", "covid", "COVID-19", 5),
        ("cohen", "other", "TB", 1),
    ])
    rows, notes = select_task(manifest, _recipe(task="kermany3", sources=["kermany"]))
    assert rows.groupby("class_name").size().to_dict() == {"bacterial": 3, "normal": 4, "viral": 2}
    assert rows.set_index("class_name")["target"].groupby(level=0).first().to_dict() == {"normal": 0, "bacterial": 1, "viral": 2}
    assert any("other sources" in n for n in notes)
    rows, _ = select_task(manifest, _recipe(task="covid_vs_rest"))
    assert rows["target"].sum() == 5 and len(rows) == len(manifest)  # 'other' counts as rest
    rows, _ = select_task(manifest, _recipe(task="covid_vs_rest", negative_labels=["pneumonia"]))  # Hall, Ben Ahmed
    assert set(rows.loc[rows["target"] == 0, "label"]) == {"pneumonia"} and rows["target"].sum() == 5
    rows, notes = select_task(manifest, _recipe(task="pneumonia_vs_normal"))
    assert set(rows["label"]) == {"pneumonia", "normal"} and any("outside the task" in n for n in notes)
    rows, _ = select_task(manifest, _recipe(task="three_class"))
    assert set(rows["class_name"]) == {"normal", "pneumonia", "covid"}
    with pytest.raises(CovidCXRError, match="'nih' is not in the collection"):
        select_task(manifest, _recipe(sources=["nih"]))


def test_multiclass_composition_borrows_then_balances_train_and_val() -> None:
    manifest = _manifest([
        ("cohen", "covid", "c", 40),
        ("cohen", "pneumonia", "p", 12),
        ("cohen", "normal", "n", 4),
        ("kermany", "normal", "n", 60),
        ("kermany", "pneumonia", "p", 60),
    ])
    recipe = _recipe(task="three_class", sources=["cohen"], negatives_from=["kermany"], balance="borrow")
    rows, _ = select_task(manifest, recipe)
    split, _ = split_records(rows, recipe)
    composed = compose_records(split, recipe)
    for name in ("train", "val"):
        counts = composed[composed["split"] == name].groupby("class_name").size()
        assert counts.nunique() == 1, counts  # balanced
    train = composed[composed["split"] == "train"]
    assert set(train.loc[train["role"] == "borrowed", "source"]) == {"kermany"}
    assert not (train["role"] == "borrowed").loc[train["class_name"] == "covid"].any()  # lenders lend negatives only


def test_kfold_split_tests_one_fold_and_validates_on_the_rest() -> None:
    manifest = _manifest([("a", "covid", "c", 30), ("a", "normal", "n", 30)])
    recipe = _recipe(split={"kind": "kfold", "folds": 3, "val_size": 0.2})
    rows, _ = select_task(manifest, recipe)
    tests = []
    for fold in range(3):
        split, _ = split_records(rows, recipe, fold=fold)
        assert set(split.loc[split["split"] == "test", "fold"]) == {fold}
        assert (split["split"] == "val").sum() > 0
        tests.extend(split.loc[split["split"] == "test", "image"])
    assert sorted(tests) == sorted(rows["image"])  # every image is tested exactly once


def test_epoch_sampler_is_balanced_seeded_and_sharded() -> None:
    targets = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(targets, balanced=True, seed=3)
    order = sampler.order(0)
    assert len(order) == 100 and 0.35 < targets[order].mean() < 0.65  # ~half positives
    assert order == EpochSampler(targets, balanced=True, seed=3).order(0)
    assert order != sampler.order(1)
    plain = EpochSampler(targets, balanced=False, seed=3).order(0)
    assert sorted(plain) == list(range(100))
    shards = [EpochSampler(targets, balanced=False, seed=3, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 34 for s in shards)
    union = sum((s.order(0) for s in shards), [])
    assert set(union) == set(range(100))


def test_resumable_loader_skips_the_batches_already_done() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    sampler = EpochSampler(np.zeros(20, dtype=int), balanced=False, seed=0)
    progress = {"value": (2, 3)}
    loader = ResumableDataLoader(dataset, batch_size=4, sampler=sampler, progress=lambda: progress["value"])
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done": 3, "batch_size": 4}
    full = [int(i) for i in sampler.order(2)]
    loader.load_state_dict(state)
    seen = [int(i) for (batch,) in loader for i in batch]
    assert seen == full[12:]
    sampler.set_epoch(2)
    assert [int(i) for (batch,) in loader for i in batch] == full  # the next pass is a whole epoch
    loader.load_state_dict({"epoch": 2, "batches_done": 5, "batch_size": 4})  # a finished epoch
    assert [int(i) for (batch,) in loader for i in batch] == sampler.order(3)


def test_rigid_augment_is_rigid() -> None:
    x = torch.zeros(4, 1, 32, 48)
    x[:, :, 10:20, 10:14] = 1.0
    identity = rigid_augment(x, 0.0, 0.0, 0.0)
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)
    flipped = rigid_augment(x, 0.0, 0.0, 1.0)
    torch.testing.assert_close(flipped, torch.flip(x, dims=[3]), atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(0)
    moved = rigid_augment(x, 10.0, 0.1, 0.5, generator)
    # a rotation + shift keeps the bright area (up to bilinear blur at the edges), it never scales it
    assert torch.allclose(moved.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.08)
    assert not torch.allclose(moved, x)
    # a 90-degree rotation of a non-square image turns a horizontal bar into a vertical one of the same length
    bar = torch.zeros(1, 1, 41, 61)
    bar[0, 0, 20, 20:41] = 1.0  # 21 px long, centred
    rotated = rigid_warp(bar, torch.tensor([90.0]), torch.zeros(1, 2), torch.tensor([False]))
    column = rotated[0, 0, :, 30]
    assert column.sum() == pytest.approx(21.0, abs=0.5) and rotated[0, 0, 20, :].sum() < 1.5
    # a shift of +0.1 of the width moves the content right by 6.1 px
    shifted = rigid_warp(bar, torch.zeros(1), torch.tensor([[0.1, 0.0]]), torch.tensor([False]))
    columns = torch.arange(61, dtype=torch.float32)

    def centre(row: torch.Tensor) -> float:
        return float((row * columns).sum() / row.sum())

    assert centre(shifted[0, 0, 20]) - centre(bar[0, 0, 20]) == pytest.approx(6.1, abs=0.05)


def test_degenerate_strided_convolutions_run_in_fp32() -> None:
    from covidcxr.models import create_model

    model = create_model("conv8", num_classes=1, width=8)
    names = protect_degenerate_convs(model, 1, (64, 64))
    assert names == ["stages.7.0"]  # the last layer sees a 1x1 map at 64 px
    x = torch.randn(8, 1, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert protect_degenerate_convs(create_model("conv8", num_classes=1), 1, (224, 224)) == []


def test_build_records_on_phantoms(tmp_path: Path) -> None:
    recipe = recipe_from_mapping(tiny_train_recipe(tmp_path))
    records, notes, rejected = build_records(recipe)
    assert {"split", "target", "class_name", "role", "fold"} <= set(records.columns)
    train = records[records["split"] == "train"]
    assert train["target"].mean() == pytest.approx(0.5)  # balanced by composition
    assert math.isclose(records["target"].isin([0, 1]).mean(), 1.0)
    assert rejected == []


def test_training_straight_from_a_hospital_folder_groups_copies_and_refuses_conflicts(tmp_path: Path) -> None:
    """load_records on a raw layout finds exact copies and near-duplicates; copies under another label stop it."""
    import shutil

    from covidcxr.errors import LabelConflictError
    from covidcxr.io.writers import write_png
    from covidcxr.train.data import load_records

    root = tmp_path / "ward"
    rng = np.random.default_rng(0)
    for label in ("covid", "normal"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            write_png(root / label / f"{index}.png", rng.random((48, 48)).astype(np.float32))
    shutil.copy(root / "covid" / "0.png", root / "covid" / "0-again.png")
    recipe = recipe_from_mapping({"data": {"collection": str(root), "task": "covid_vs_rest"}})
    manifest, rejected = load_records(recipe)
    assert rejected == []
    copies = manifest[manifest["image"].str.contains(r"covid/0(?:-again)?\.png$")]
    assert len(copies) == 2 and copies["dup_group"].nunique() == 1 and copies["dup_group"].notna().all()
    shutil.copy(root / "covid" / "0.png", root / "normal" / "misfiled.png")
    with pytest.raises(LabelConflictError, match=r"normal/misfiled\.png \(normal\)"):
        load_records(recipe)
