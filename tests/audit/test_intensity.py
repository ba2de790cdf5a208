"""The intensity-window perturbation changes only what lies outside the lungs."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from covidcxr.audit.intensity import intensity_perturbation


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
