"""Masks that keep the disease: recall per label, area ratios, shape cues, opacity augmentation, recall-weighted loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.lung_augment import RandCollimationd, RandLungOpacityd
from covidcxr.preprocess.lung_coverage import area_ratio_by_source, lung_recall, lung_shape, recall_by_label
from covidcxr.preprocess.screening import opacity_cut_warnings


def _lungs(size: int = 128, cut: float = 0.0) -> np.ndarray:
    """Two rectangular lungs; ``cut`` removes that share of the right one's lower part."""
    mask = np.zeros((size, size), bool)
    top, bottom = size // 8, size - size // 8
    mask[top:bottom, size // 10 : size // 2 - 6] = True
    mask[top : int(bottom - cut * (bottom - top)), size // 2 + 6 : size - size // 10] = True
    return mask


def test_recall_is_the_share_of_the_reference_kept_and_refuses_mismatched_shapes():
    truth = _lungs()
    assert lung_recall(truth, truth) == 1.0
    assert lung_recall(_lungs(cut=0.5), truth) == pytest.approx(0.75, abs=0.01)
    assert lung_recall(np.ones_like(truth), truth) == 1.0  # recall ignores what is added
    with pytest.raises(CovidCXRError, match="differ in shape"):
        lung_recall(truth, truth[:-1])


def test_recall_by_label_gives_patient_intervals_and_the_disease_gap():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        label = "covid" if i < 15 else "other"
        for j in range(2):  # two images per patient
            recall = (0.85 if label == "covid" else 0.98) + rng.normal(0, 0.01)
            rows.append({"image": f"{i}-{j}.png", "patient_id": f"p{i}", "source": "s", "label": label, "recall": recall})
    result = recall_by_label(pd.DataFrame(rows), n_boot=200)
    covid = result["per_label"]["covid"]
    assert covid["n_images"] == 30 and covid["n_patients"] == 15
    assert covid["ci"][0] <= covid["mean"] <= covid["ci"][1] and covid["low_recall_share"] > 0.8
    assert result["per_label"]["other"]["low_recall_share"] == 0.0
    gap = result["disease_minus_rest"]
    assert gap["estimate"] == pytest.approx(-0.13, abs=0.01) and gap["ci"][1] < 0
    assert "s/covid" in result["per_source_label"]
    with pytest.raises(CovidCXRError, match="recall"):
        recall_by_label(pd.DataFrame({"image": ["a"], "label": ["covid"], "source": ["s"]}))


def test_area_ratio_is_within_source_and_skips_sources_without_normals():
    rows = [{"image": f"a{i}", "patient_id": f"a{i}", "source": "a", "label": "pneumonia" if i % 2 else "normal", "area": 0.2 if i % 2 else 0.25} for i in range(20)]
    rows += [{"image": f"b{i}", "patient_id": f"b{i}", "source": "b", "label": "covid", "area": 0.1} for i in range(5)]
    ratios = area_ratio_by_source(pd.DataFrame(rows), n_boot=100)
    assert set(ratios) == {"a"}
    ratio = ratios["a"]["pneumonia_over_normal"]
    assert ratio["estimate"] == pytest.approx(0.8) and ratio["n_images"] == 20 and ratio["n_patients"] == 20
    assert ratios["a"]["normal"]["mean"] == pytest.approx(0.25)


def test_lung_shape_and_the_opacity_cut_warning_fire_on_a_shortened_lung_only():
    assert lung_shape(_lungs())["height_ratio"] == 1.0
    short = lung_shape(_lungs(cut=0.4))
    assert short["height_ratio"] == pytest.approx(0.6, abs=0.02)
    assert np.isnan(lung_shape(np.ones((20, 20), bool))["height_ratio"])  # one piece: left to the balance check
    assert opacity_cut_warnings(_lungs()) == []
    (warning,) = opacity_cut_warnings(_lungs(cut=0.4))
    assert warning.code == "possible_opacity_cut" and "shorter" in warning.message


def test_the_height_ratio_alone_matches_scikit_image_regionprops():
    """`lung_height_ratio` (no convex hull, on every prediction) = the ratio regionprops gave, ties included."""
    from scipy import ndimage
    from skimage.measure import label, regionprops

    from covidcxr.preprocess.lung_coverage import lung_height_ratio

    rng = np.random.default_rng(5)
    for trial in range(80):
        noise = ndimage.gaussian_filter(rng.random((int(rng.integers(10, 90)), int(rng.integers(10, 90)))), sigma=rng.uniform(0.5, 4))
        mask = noise > np.quantile(noise, rng.uniform(0.3, 0.8))
        regions = sorted(regionprops(label(mask, connectivity=2)), key=lambda r: r.area, reverse=True)[:2]
        got = lung_height_ratio(mask)
        if len(regions) < 2:
            assert np.isnan(got), trial
        else:
            heights = [r.bbox[2] - r.bbox[0] for r in regions]
            assert got == round(min(heights) / max(heights), 4), trial
    tie = np.zeros((20, 20), bool)
    tie[2:10, 1:3] = tie[2:6, 5:9] = tie[12:14, 12:16] = True  # three pieces of 16 px: the first two count
    assert lung_height_ratio(tie) == 0.5


def test_opacity_augmentation_whitens_inside_the_lungs_only_and_keeps_the_mask():
    size = 96
    lungs = torch.from_numpy(_lungs(size)).float()
    label = torch.stack([lungs, torch.zeros_like(lungs)])
    image = torch.full((1, size, size), 0.2)
    transform = RandLungOpacityd(prob=1.0, strength=(0.8, 0.9))
    transform.set_random_state(seed=3)
    out = transform({"image": image, "label": label})
    assert torch.equal(out["label"], label)
    changed = (out["image"][0] - 0.2).abs() > 1e-3
    assert changed.any() and float(out["image"].max()) > 0.5
    outside = ~torch.from_numpy(np.asarray(__import__("scipy").ndimage.binary_dilation(_lungs(size), iterations=3)))
    assert not changed[outside].any()
    # an image without any reference lung is left alone
    empty = transform({"image": image, "label": torch.zeros_like(label)})
    assert torch.equal(empty["image"], image)


def test_collimation_clears_image_and_mask_in_the_same_band():
    transform = RandCollimationd(prob=1.0, width=(0.1, 0.1))
    transform.set_random_state(seed=0)
    label = torch.ones((2, 50, 50))
    out = transform({"image": torch.full((1, 50, 50), 0.5), "label": label})
    cleared = out["label"][0] == 0
    assert cleared.any()
    assert torch.all((out["image"][0][cleared] == 0) | (out["image"][0][cleared] == 1))


def test_training_augmentation_with_opacities_and_site_transforms_keeps_shapes_and_range():
    from covidcxr.preprocess.lung_training import build_augmentation

    transform = build_augmentation(64, seed=0, opacity_prob=1.0, site_prob=1.0)
    label = torch.stack([torch.from_numpy(_lungs(64)).float()] * 2)
    out = transform({"image": torch.rand(1, 64, 64) * 0.4, "label": label})
    image = torch.as_tensor(out["image"])
    assert image.shape == (1, 64, 64) and torch.as_tensor(out["label"]).shape == (2, 64, 64)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_recall_weighted_loss_punishes_a_missed_pixel_more_than_an_added_one():
    from covidcxr.preprocess.lung_training import make_loss

    target = torch.zeros((1, 1, 32, 32))
    target[..., 8:24, 8:24] = 1
    missed, added = target.clone(), target.clone()
    missed[..., 8:12, 8:24] = 0
    added[..., 4:8, 8:24] = 1
    logits = lambda m: (m * 2 - 1) * 8.0  # noqa: E731 (a confident prediction of mask m)
    tversky, dice = make_loss("tversky_ce"), make_loss("dice_ce")
    assert float(tversky(logits(missed), target)) > float(tversky(logits(added), target))
    # the asymmetry is the Tversky term's: Dice+CE treats the two errors (nearly) alike
    tversky_ratio = float(tversky(logits(missed), target)) / float(tversky(logits(added), target))
    dice_ratio = float(dice(logits(missed), target)) / float(dice(logits(added), target))
    assert tversky_ratio > dice_ratio + 0.1
    with pytest.raises(CovidCXRError, match="unknown segmentation loss"):
        make_loss("focal")
