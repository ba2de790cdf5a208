from __future__ import annotations

import numpy as np
import pytest

from covidcxr.preprocess.equalize import equalize, equalize_clahe, equalize_histogram, harmonize_jpeg, normalize_intensity


def _ramp(low: float, high: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (low + (high - low) * rng.random((64, 64)) ** 2).astype(np.float32)


def test_histogram_equalization_removes_a_sites_intensity_range():
    dark, bright = _ramp(0.05, 0.4), _ramp(0.5, 0.95)
    dark_eq, bright_eq = equalize_histogram(dark), equalize_histogram(bright)
    assert abs(dark.mean() - bright.mean()) > 0.3
    assert abs(dark_eq.mean() - bright_eq.mean()) < 0.01
    # near-uniform histogram: every decile holds about a tenth of the pixels
    counts, _ = np.histogram(dark_eq, bins=10, range=(0, 1))
    assert counts.min() > 0.07 * dark_eq.size and counts.max() < 0.13 * dark_eq.size
    assert dark_eq.dtype == np.float32 and 0.0 <= dark_eq.min() and dark_eq.max() <= 1.0


def test_equalization_with_a_mask_ignores_the_background():
    image = _ramp(0.3, 0.7)
    image[:, :32] = 0.0  # black collimation border
    body = image > 0
    with_mask = equalize_histogram(image, mask=body)
    assert with_mask[body].mean() == pytest.approx(0.5, abs=0.03)


def test_clahe_and_normalization():
    image = _ramp(0.2, 0.6)
    out = equalize_clahe(image)
    assert out.shape == image.shape and out.std() > image.std()
    assert normalize_intensity(np.full((4, 4), 3.0)).max() == 0.0
    np.testing.assert_allclose(normalize_intensity(np.array([[1.0, 3.0]])), [[0.0, 1.0]])
    assert equalize(image, "none").max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown equalization"):
        equalize(image, "gamma")


def test_jpeg_harmonization_is_lossy_but_close():
    image = _ramp(0.0, 1.0)
    out = harmonize_jpeg(image, quality=90)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0 < np.abs(out - image).mean() < 0.1
    # re-encoding a harmonised image changes it much less than the first encoding did
    assert np.abs(harmonize_jpeg(out) - out).mean() < np.abs(out - image).mean()


@pytest.mark.parametrize("kind", ["uniform", "skewed", "background", "quantised_8bit", "tiny"])
def test_fast_histogram_equalization_matches_scikit_image(kind):
    """`equalize_histogram` replaces np.interp by index arithmetic: scikit-image's result to float32 rounding."""
    from skimage import exposure

    rng = np.random.default_rng(7)
    image = {
        "uniform": rng.random((257, 300)),
        "skewed": rng.random((200, 180)) ** 6,
        # a third of the film one black value (collimation): one bin holds a large share
        "background": np.where(rng.random((256, 256)) < 0.33, 0.0, 0.2 + 0.8 * rng.random((256, 256))),
        "quantised_8bit": np.round(rng.random((128, 96)) * 255) / 255,
        "tiny": np.array([[0.1, 0.5], [0.5, 0.9]]),
    }[kind].astype(np.float32)
    expected = exposure.equalize_hist(image, nbins=256).astype(np.float32)
    got = equalize_histogram(image)
    assert got.dtype == np.float32 and got.shape == image.shape
    assert float(np.abs(got - expected).max()) <= 1e-6
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0 + 1e-6
