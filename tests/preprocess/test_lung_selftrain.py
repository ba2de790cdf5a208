"""Semi-supervised self-training of the lung U-Net: pool, pseudo-label filter, sampler, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.lung_training import (
    SegmentationArrays,
    _make_sampler,
    mask_area_range,
    plausible_lungs,
    pseudo_confidence,
    pseudo_label,
    unlabelled_rows,
)


def _two_lungs(size: int = 64, right_height: int = 40, left_height: int = 40) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[10 : 10 + right_height, 8:28] = True
    mask[10 : 10 + left_height, 36:56] = True
    return mask


class _FixedTeacher:
    """Returns given probability maps: stands in for `LungSegmenter` so the filter is tested alone."""

    conventions = ("heart_excluded", "retrocardiac")
    threshold = 0.5
    batch_size = 2

    def __init__(self, probabilities: np.ndarray):
        self.probabilities, self.calls = probabilities, 0

    def forward_prepared(self, batch: np.ndarray) -> np.ndarray:
        out = self.probabilities[self.calls : self.calls + len(batch)]
        self.calls += len(batch)
        return out


def test_unlabelled_pool_leaves_out_val_and_test_patients_duplicates_and_masked_images():
    manifest = pd.DataFrame(
        {
            "image": [f"i{k}.png" for k in range(6)],
            "mask": ["m0.png", "m1.png", None, None, None, None],
            "patient_id": ["p-train", "p-test", "p-test", "p-train", "p-other", "p-new"],
            "dup_group": [None, "g1", None, None, "g1", None],
            "sha1": ["s0", "s1", "s2", "s3", "s4", "s1"],
            "source": "x",
            "label": "covid",
        }
    )
    split = manifest.iloc[:2].assign(split=["train", "test"])
    pool = unlabelled_rows(manifest, split)
    # i2: a test patient; i4: near-duplicate of a test image; i5: the test image's file under another name
    assert pool["image"].tolist() == ["i3.png"]


def test_confidence_counts_uncertain_pixels_against_the_lung_area():
    mask = _two_lungs()
    sharp = np.where(mask, 0.99, 0.01).astype(np.float32)
    fuzzy = sharp.copy()
    fuzzy[30:50, 8:28] = 0.5  # half of one lung grey
    assert pseudo_confidence(sharp, mask) == pytest.approx(1.0)
    assert pseudo_confidence(fuzzy, mask) == pytest.approx(1.0 - 400 / mask.sum())


def test_plausibility_rejects_one_lung_a_cut_lower_zone_and_odd_sizes():
    area = (0.1, 0.6)
    assert plausible_lungs(_two_lungs(), area)
    assert not plausible_lungs(_two_lungs(left_height=20), area)  # shorter lung < 0.8 of the taller: a cut base
    one = _two_lungs()
    one[:, 32:] = False
    assert not plausible_lungs(one, area)
    assert not plausible_lungs(_two_lungs(), (0.5, 0.9))


def test_pseudo_label_keeps_the_most_confident_plausible_images_in_both_channels():
    good, cut = _two_lungs(), _two_lungs(left_height=20)
    sharp = np.where(good, 0.99, 0.01)
    fuzzy = sharp.copy()
    fuzzy[30:50, 8:28] = 0.6
    maps = np.stack(
        [
            np.stack([sharp, sharp]),  # confident, plausible
            np.stack([fuzzy, fuzzy]),  # plausible, less confident
            np.stack([np.where(cut, 0.99, 0.01)] * 2),  # confident but a cut lung: never kept
            np.stack([sharp, np.where(cut, 0.99, 0.01)]),  # one channel implausible: dropped
        ]
    ).astype(np.float32)
    arrays = SegmentationArrays(np.random.default_rng(0).random((4, 1, 64, 64), dtype=np.float32), np.zeros((4, 2, 64, 64), np.uint8), np.zeros((4, 2), bool))
    rows = pd.DataFrame({"image": list("abcd"), "source": "s", "label": "pneumonia"})
    pseudo, report = pseudo_label(_FixedTeacher(maps), arrays, rows, keep=0.5, area_range=(0.1, 0.6))
    assert report["plausible"].tolist() == [True, True, False, False]
    assert report["kept"].tolist() == [True, False, False, False]
    assert pseudo.images.shape == (1, 1, 64, 64) and np.array_equal(pseudo.images[0], arrays.images[0])
    assert pseudo.has.all() and np.array_equal(pseudo.labels[0, 0].astype(bool), good)
    pseudo, report = pseudo_label(_FixedTeacher(maps), arrays, rows, keep=1.0, area_range=(0.1, 0.6))
    assert report["kept"].tolist() == [True, True, False, False] and len(pseudo.images) == 2
    with pytest.raises(CovidCXRError, match="pseudo_keep"):
        pseudo_label(_FixedTeacher(maps), arrays, rows, keep=0.0, area_range=(0.1, 0.6))


def test_area_range_comes_from_the_annotated_channels_only():
    labels = np.zeros((3, 2, 10, 10), np.uint8)
    labels[0, 0, :2] = 1  # 0.2
    labels[1, 1, :4] = 1  # 0.4
    labels[2, 0, :9] = 1  # 0.9, but channel 0 of image 2 is not annotated
    has = np.array([[True, False], [False, True], [False, False]])
    low, high = mask_area_range(SegmentationArrays(np.zeros((3, 1, 10, 10), np.float32), labels, has), 0, 100)
    assert (low, high) == pytest.approx((0.2, 0.4))


def test_sampler_gives_pseudo_labels_their_share_and_keeps_the_labelled_draws():
    rows = pd.DataFrame({"annotator": ["a"] * 90 + ["b"] * 10})
    draws = np.array(list(_make_sampler(rows, seed=0, n_pseudo=500, pseudo_share=0.5)))
    assert len(draws) == 200
    assert 0.4 < (draws >= 100).mean() < 0.6
    assert len(list(_make_sampler(rows, seed=0))) == 100 and max(_make_sampler(rows, seed=0)) < 100
    with pytest.raises(CovidCXRError, match="pseudo_share"):
        _make_sampler(rows, seed=0, n_pseudo=5, pseudo_share=1.0)


def test_cli_self_training_records_the_pool_and_leaves_held_out_patients_out(tmp_path):
    from covidcxr.data.synth import synthesize

    data = tmp_path / "phantoms"
    synthesize(data, n_images=16, size=64, seed=3)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest.loc[manifest.index[-5:], "mask"] = ""
    manifest.to_csv(data / "manifest.csv", index=False)
    runner = CliRunner()
    base = ["segment", "train", "--data", str(data), "--size", "64", "--width", "4", "--batch-size", "4", "--no-progress", "--epochs", "1"]
    first = tmp_path / "first"
    assert runner.invoke(app, [*base, "--out", str(first), "--run-dir", str(tmp_path / "r1")]).exit_code == 0
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "st"), "--run-dir", str(tmp_path / "r2"), "--init-weights", str(first / "lung_unet.pt"), "--pseudo-share", "0.4"])
    assert result.exit_code == 0, result.output
    assert "pseudo-labelling" in result.output
    metadata = json.loads((tmp_path / "st" / "lung_unet.json").read_text())
    summary = metadata["training"]["self_training"]
    held = {r["patient_id"] for r in metadata["split"]["test"]}
    pool = unlabelled_rows(pd.read_csv(data / "manifest.csv").replace("", np.nan), pd.DataFrame({"patient_id": sorted(held), "split": "test"}))
    assert summary["teacher"] == str(first / "lung_unet.pt") and summary["share_of_draws"] == 0.4
    assert summary["pool"] <= 5 and summary["kept"] <= summary["plausible"] <= summary["pool"]
    # the pool also leaves out the validation patients, so it is at most the unmasked images of non-test patients
    assert summary["pool"] == sum(summary["pool_by_source_label"].values()) <= len(pool)
    assert len(summary["kept_sha1"]) == summary["kept"]
