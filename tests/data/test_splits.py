from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.splits import check_leakage, group_kfold, leave_one_source_out, linked_groups, split_train_val_test
from covidcxr.errors import LeakageError


def test_holdout_is_patient_disjoint_and_near_requested_fractions(tiny_manifest):
    split = split_train_val_test(tiny_manifest, test_size=0.3, val_size=0.2, stratify=("source", "label"), seed=1)
    per_patient = split.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    fractions = split["split"].value_counts(normalize=True)
    assert abs(fractions["test"] - 0.3) < 0.08
    assert abs(fractions["val"] - 0.7 * 0.2) < 0.08
    # every source x label stratum reaches the test set
    assert set(split[split["split"] == "test"].groupby(["source", "label"]).size().index) == set(
        split.groupby(["source", "label"]).size().index
    )


def test_holdout_is_deterministic_for_a_seed(tiny_manifest):
    first = split_train_val_test(tiny_manifest, seed=3)["split"].tolist()
    assert first == split_train_val_test(tiny_manifest, seed=3)["split"].tolist()
    assert first != split_train_val_test(tiny_manifest, seed=4)["split"].tolist()


def test_patient_crossing_train_test_is_rejected(tiny_manifest):
    split = split_train_val_test(tiny_manifest, seed=0)
    test_row = split.index[split["split"] == "test"][0]
    train_row = split.index[split["split"] == "train"][0]
    patient = split.at[test_row, "patient_id"]
    split.at[train_row, "patient_id"] = patient
    with pytest.raises(LeakageError) as info:
        check_leakage(split)
    assert len(info.value.offenders) == 1
    assert patient in info.value.offenders[0]
    assert "train:" in info.value.offenders[0] and "test:" in info.value.offenders[0]


def test_duplicate_group_links_patients_and_stays_on_one_side(tiny_manifest):
    manifest = tiny_manifest.copy()
    # two different patients whose images are copies of each other
    manifest.loc[[0, 40], "dup_group"] = "dup0001"
    groups = linked_groups(manifest)
    assert groups[0] == groups[40] == groups[1]  # row 1 is row 0's patient's second image
    for seed in range(5):
        split = split_train_val_test(manifest, seed=seed)
        assert split.loc[0, "split"] == split.loc[40, "split"]
    split.loc[0, "split"], split.loc[40, "split"] = "train", "test"
    split.loc[1, "split"] = "train"
    split.loc[manifest["patient_id"] == manifest.at[40, "patient_id"], "split"] = "test"
    with pytest.raises(LeakageError, match="near-duplicate group dup0001"):
        check_leakage(split)


def test_group_kfold_keeps_patients_in_one_fold(tiny_manifest):
    folds = group_kfold(tiny_manifest, n_splits=4, seed=0)
    assert sorted(folds["fold"].unique().tolist()) == [0, 1, 2, 3]
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 4  # 2 images per patient: folds within two patients of each other
    crossed = folds.copy()
    crossed.loc[crossed.index[crossed["patient_id"] == crossed.at[0, "patient_id"]][1], "fold"] = (folds.at[0, "fold"] + 1) % 4
    with pytest.raises(LeakageError, match="across 'fold'"):
        check_leakage(crossed, column="fold")


def test_leave_one_source_out_removes_training_copies_of_test_images(tiny_manifest):
    manifest = tiny_manifest.copy()
    a_row = manifest.index[manifest["source"] == "site_a"][0]
    b_row = manifest.index[manifest["source"] == "site_b"][0]
    manifest.loc[[a_row, b_row], "dup_group"] = "dup0001"
    split, removed = leave_one_source_out(manifest, "site_b", val_size=0.25)
    assert set(split.loc[split["source"] == "site_b", "split"]) == {"test"}
    assert set(split.loc[split["source"] == "site_a", "split"]) == {"train", "val"}
    removed_images = {r.path for r in removed}
    # the site_a copy and the other image of its patient (same patient) are removed
    patient = manifest.at[a_row, "patient_id"]
    assert removed_images == set(manifest.loc[manifest["patient_id"] == patient, "image"])
    assert not split["image"].isin(removed_images).any()


def test_shared_collection_split_has_no_leakage(shared_collection):
    from covidcxr.data.sources import load_source

    manifest = load_source(shared_collection).manifest
    split = split_train_val_test(manifest, stratify=("source", "label"))
    counts = split["split"].value_counts(normalize=True)
    assert counts["test"] == pytest.approx(0.3, abs=0.02)
    # the curated duplicate groups never straddle a boundary
    grouped = split[split["dup_group"].notna()]
    assert (grouped.groupby("dup_group")["split"].nunique() == 1).all()
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()


def _class_folders_with_cross_label_copies(root, copies: int = 8, conflicting: bool = True):
    """covid/ and normal/ folders of distinct noise images, plus byte-identical copies of covid/0.png."""
    import shutil

    from covidcxr.io.writers import write_png

    rng = np.random.default_rng(0)
    for label in ("covid", "normal"):
        (root / label).mkdir(parents=True)
        for index in range(12):
            write_png(root / label / f"{index}.png", rng.random((48, 48)).astype(np.float32))
    target = "normal" if conflicting else "covid"
    for index in range(copies):
        shutil.copy(root / "covid" / "0.png", root / target / f"copy{index}.png")
    return root


def test_copies_under_another_label_are_an_error_naming_the_files(tmp_path):
    """The issue's reproduction: 8 copies under the other label used to be split apart silently."""
    from covidcxr.data.sources import load_source
    from covidcxr.errors import LabelConflictError

    root = _class_folders_with_cross_label_copies(tmp_path / "hospital")
    manifest = load_source(root, "hospital").manifest
    for splitter in (split_train_val_test, lambda m: group_kfold(m, n_splits=3)):
        with pytest.raises(LabelConflictError) as info:
            splitter(manifest)
        message = str(info.value)
        assert "covid/0.png (covid)" in message and "normal/copy7.png (normal)" in message


def test_exact_copies_are_linked_by_sha1_without_a_dup_group(tmp_path):
    from covidcxr.data.sources import load_source

    root = _class_folders_with_cross_label_copies(tmp_path / "hospital", conflicting=False)
    manifest = load_source(root, "hospital").manifest
    assert manifest["dup_group"].isna().all()  # nothing listed: only the file hashes link them
    copies = manifest["sha1"] == manifest.loc[manifest["image"].str.endswith("covid/0.png"), "sha1"].iloc[0]
    assert copies.sum() == 9
    for seed in range(4):
        split = split_train_val_test(manifest, seed=seed)
        assert split.loc[copies.to_numpy(), "split"].nunique() == 1
    # and a split made elsewhere that separates them is caught from the sha1 alone
    split.loc[np.flatnonzero(copies.to_numpy())[0], "split"] = "test"
    split.loc[np.flatnonzero(copies.to_numpy())[1], "split"] = "train"
    with pytest.raises(LeakageError, match=r"exact copy \(sha1\)"):
        check_leakage(split)


def test_link_duplicates_groups_near_copies_from_pixels(tmp_path):
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import link_duplicates
    from covidcxr.io import read_image
    from covidcxr.io.writers import write_png

    root = _class_folders_with_cross_label_copies(tmp_path / "hospital", copies=0)
    pixels = read_image(root / "covid" / "3.png").pixels
    write_png(root / "covid" / "3-reencoded.png", pixels, bits=16)  # same picture, other bytes
    manifest = load_source(root, "hospital").manifest
    linked, unreadable = link_duplicates(manifest)
    assert unreadable == []
    groups = linked.set_index(linked["image"].str.rsplit("/", n=2).str[-2:].str.join("/"))["dup_group"]
    assert groups["covid/3.png"] == groups["covid/3-reencoded.png"] and isinstance(groups["covid/3.png"], str)


def test_link_duplicates_hashes_the_bytes_not_the_manifest_column(tmp_path):
    """A manifest whose sha1 describes other files (e.g. the original downloads) cannot hide copies."""
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import link_duplicates
    from covidcxr.errors import LabelConflictError

    root = _class_folders_with_cross_label_copies(tmp_path / "hospital", copies=2)
    manifest = load_source(root, "hospital").manifest
    manifest["sha1"] = [f"{index:040x}" for index in range(len(manifest))]  # stale, all different
    check_leakage(manifest.assign(split="train"))  # nothing to see from the columns alone
    with pytest.raises(LabelConflictError, match="file_sha1"):
        link_duplicates(manifest)
