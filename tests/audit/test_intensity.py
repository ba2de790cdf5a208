"""The intensity-window perturbation changes only what lies outside the lungs; the outside-lung intensity baseline reads only them."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from covidcxr.audit.intensity import intensity_perturbation, label_from_intensity, outside_lung_features


class _Run:
    """A stand-in run whose score is the mean intensity of one half of the image."""

    def __init__(self, columns, lungs="none"):
        self.columns = columns
        self.threshold = 0.5
        self.recipe = SimpleNamespace(preprocess=SimpleNamespace(equalization="none", lungs=lungs))

    def predict(self, images):
        return np.asarray(images)[:, :, self.columns].mean(axis=(1, 2))


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3, 0.7, size=(n, 8, 8)).astype(np.float32)
    masks = np.zeros((n, 8, 8), dtype=bool)
    masks[:, :, 4:] = True  # the right half is "lung"
    rows = pd.DataFrame({"target": np.arange(n) % 2, "patient_id": [f"p{i}" for i in range(n)]})
    return images, masks, rows


def test_a_model_reading_the_lungs_ignores_a_window_outside_them():
    images, masks, rows = _data()
    result = intensity_perturbation(_Run(slice(4, 8)), images, rows, n_boot=50, lung_masks=masks)
    assert result["region"].startswith("outside the lungs")
    for part in result["windows"].values():
        assert part["flip_rate"]["estimate"] == 0.0
        assert part["mean_probability_change"] == pytest.approx(0.0)


def test_a_model_reading_the_background_follows_the_window():
    images, masks, rows = _data()
    result = intensity_perturbation(_Run(slice(0, 4)), images, rows, n_boot=50, lung_masks=masks)
    brighter = result["windows"]["brighter_flatter"]
    assert brighter["mean_probability_change"] > 0.03 and brighter["shift_auc"]["low"] > 0.9
    # without masks the whole image is windowed: the lung reader moves too (the confound the masks remove)
    whole = intensity_perturbation(_Run(slice(4, 8)), images, rows, n_boot=50)
    assert whole["region"] == "whole image" and whole["windows"]["brighter_flatter"]["mean_probability_change"] > 0.03


def test_masked_runs_skip_the_window_and_bad_shapes_are_refused():
    images, masks, rows = _data()
    assert "masks the lungs" in intensity_perturbation(_Run(slice(4, 8), lungs="mask"), images, rows, lung_masks=masks)["skipped"]
    with pytest.raises(ValueError, match="lung masks"):
        intensity_perturbation(_Run(slice(4, 8)), images, rows, lung_masks=masks[:, :4])


def _windowed(n=80, seed=0, window=True):
    """Two sources; with ``window``, positives' background is brighter and flatter (lungs: the right half)."""
    rng = np.random.default_rng(seed)
    images, masks, _ = _data(n, seed)
    target = rng.permutation(np.arange(n) % 2)
    if window:
        images[target == 1] = 0.2 + 0.7 * images[target == 1]
    lung_mean = images[:, :, 4:].mean(axis=(1, 2))
    rows = pd.DataFrame({"target": target, "patient_id": [f"p{i // 2}" for i in range(n)], "source": np.where(np.arange(n) % 4 < 2, "a", "b"),
                         "probability": lung_mean + 0.3 * target})  # the "model" reads the lungs (and the disease)
    return images, masks, rows


def test_the_label_is_read_from_outside_lung_intensities_only_when_they_carry_it():
    images, masks, rows = _windowed()
    carried = label_from_intensity(images, masks, rows, n_boot=50)
    assert carried["baseline"]["low"] > 0.8 and carried["baseline"]["n_patients"] == 40
    assert carried["difference"]["estimate"] == pytest.approx(carried["model"]["estimate"] - carried["baseline"]["estimate"])
    images, masks, rows = _windowed(window=False)
    assert label_from_intensity(images, masks, rows, n_boot=50)["baseline"]["estimate"] < 0.7
    # the lungs' content never reaches the features: changing only the (grown) lung region changes nothing
    inside = np.zeros_like(masks)
    inside[:, 2:6, 5:7] = True
    altered = np.where(inside, 1.0 - images, images)
    assert np.allclose(outside_lung_features(altered, inside), outside_lung_features(images, inside))


def test_label_from_intensity_skips_what_it_cannot_fold():
    images, masks, rows = _windowed(n=4)
    assert "fewer than 2 patients" in label_from_intensity(images, masks, rows.assign(patient_id="same"), n_boot=10)["skipped"]
    with pytest.raises(ValueError, match="rows for"):
        label_from_intensity(images, masks, rows.iloc[:2], n_boot=10)
    images, masks, rows = _windowed()
    one_class_per_source = rows.assign(source=np.where(rows["target"] == 1, "covid_site", "normal_site"))
    assert "no source holds both classes" in label_from_intensity(images, masks, one_class_per_source, n_boot=10)["skipped"]
