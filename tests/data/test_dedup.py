from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidcxr.data.dedup import (
    Fingerprints,
    assign_dup_groups,
    find_near_duplicates,
    fingerprint,
    fingerprint_images,
    near_duplicate_pairs,
)
from covidcxr.data.manifest import make_manifest
from covidcxr.data.splits import check_leakage, split_train_val_test
from covidcxr.errors import LeakageError

from generated_data import random_texture


def _copies(tmp_path, rng):
    """An original, a re-encoded and re-scaled JPEG copy, a re-windowed copy, and an unrelated image."""
    original = random_texture(rng, 128)
    Image.fromarray((original * 255).astype(np.uint8)).save(tmp_path / "original.png")
    Image.fromarray((original * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.LANCZOS).save(
        tmp_path / "copy.jpg", quality=70
    )
    rewindowed = np.clip(original * 0.8 + 0.15, 0, 1) ** 1.3
    Image.fromarray((rewindowed * 255).astype(np.uint8)).save(tmp_path / "rewindowed.png")
    Image.fromarray((random_texture(rng, 128) * 255).astype(np.uint8)).save(tmp_path / "other.png")
    return [str(tmp_path / n) for n in ("original.png", "copy.jpg", "rewindowed.png", "other.png")]


def test_near_duplicates_found_and_unrelated_image_not(tmp_path):
    paths = _copies(tmp_path, np.random.default_rng(0))
    prints, rejected = fingerprint_images(paths, workers=1, show_progress=False)
    assert rejected == [] and prints.valid.all()
    pairs = near_duplicate_pairs(prints)
    found = {(int(i), int(j)) for i, j in pairs[["i", "j"]].to_numpy()}
    assert found == {(0, 1), (0, 2), (1, 2)}
    assert pairs["hash_distance"].max() <= 40


def test_fingerprint_of_flat_image_matches_nothing():
    flat = np.full((32, 32), 0.5, np.float32)
    _, thumbnail = fingerprint(flat)
    assert not thumbnail.any()


def test_unreadable_image_is_reported_not_dropped(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    prints, rejected = fingerprint_images([str(bad)], workers=1, show_progress=False)
    assert not prints.valid[0]
    assert len(rejected) == 1 and rejected[0].path == str(bad) and "bad.png" in rejected[0].reason


def test_near_duplicate_across_train_test_is_caught(tmp_path):
    paths = _copies(tmp_path, np.random.default_rng(1))
    manifest = make_manifest(
        [
            {"image": p, "source": "s", "label": "covid", "patient_id": f"s:{k}", "sha1": None}
            for k, p in enumerate(paths)
        ]
    )
    manifest["split"] = ["train", "test", "train", "test"]
    # patients differ, dup_group is empty: only the fingerprints can see the copy
    check_leakage(manifest)
    prints, _ = fingerprint_images(paths, workers=1, show_progress=False)
    with pytest.raises(LeakageError) as info:
        check_leakage(manifest, fingerprints=prints)
    assert any("copy.jpg" in line and "original.png" in line for line in info.value.offenders)
    # once dup_group is filled, splitting keeps the copies together and the check passes
    grouped, pairs, _ = find_near_duplicates(manifest.drop(columns="split"), workers=1, show_progress=False)
    assert grouped.loc[0, "dup_group"] == grouped.loc[1, "dup_group"] == grouped.loc[2, "dup_group"] == "dup0001"
    assert grouped["dup_group"].isna().iloc[3]
    split = split_train_val_test(grouped, test_size=0.5, val_size=0.0, stratify=())
    check_leakage(split, fingerprints=prints)
    assert len(set(split.loc[[0, 1, 2], "split"])) == 1


def test_identical_files_are_grouped_by_sha1():
    manifest = make_manifest(
        [{"image": f"/x/{k}.png", "source": "s", "label": "normal", "patient_id": f"s:{k}", "sha1": "b" * 40 if k < 2 else None} for k in range(3)]
    )
    grouped = assign_dup_groups(manifest)
    assert grouped["dup_group"].tolist()[:2] == ["dup0001", "dup0001"] and grouped["dup_group"].isna().iloc[2]


def test_fingerprints_save_and_load(tmp_path):
    prints = Fingerprints(np.arange(8, dtype=np.uint64).reshape(2, 4), np.ones((2, 1024), np.float32), np.array([True, False]))
    prints.save(tmp_path / "f.npz")
    back = Fingerprints.load(tmp_path / "f.npz")
    assert (back.hashes == prints.hashes).all() and back.valid.tolist() == [True, False]


def test_shared_collection_curated_duplicates_are_found(shared_collection):
    from covidcxr.data.sources import load_source

    manifest = load_source(shared_collection).manifest
    curated = manifest["dup_group"].copy()
    grouped, pairs, rejected = find_near_duplicates(manifest.assign(dup_group=None), workers=2, show_progress=False)
    assert rejected == []
    # the calibration figures in dedup.py's docstring: 16 of 21 curated pairs
    same = 0
    for group, members in curated.dropna().groupby(curated.dropna()):
        rows = members.index.tolist()
        same += sum(1 for a in rows for b in rows if a < b and grouped.at[a, "dup_group"] == grouped.at[b, "dup_group"] and grouped.at[a, "dup_group"] is not None)
    assert same >= 16
    assert len(pairs) <= 20
