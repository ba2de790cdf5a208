"""Occlusion saliency (`covidcxr.audit.occlusion`): where covering the input lowers the score, for a plain function."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr.audit.occlusion import occlusion_positions, occlusion_saliency
from covidcxr.audit.saliency import lung_focus_fraction
from covidcxr.errors import CovidCXRError


def corner_score(images: np.ndarray) -> np.ndarray:
    """The mean of the top-right 8 x 8 corner: a model that reads only there."""
    return images[:, :8, -8:].mean(axis=(1, 2))


def test_the_map_lies_where_the_score_is_read() -> None:
    images = np.full((3, 32, 32), 0.5, np.float32)
    maps = occlusion_saliency(corner_score, images, patch=4)
    assert maps.shape == images.shape and maps.dtype == np.float32
    assert np.allclose(maps[:, :8, -8:], 1.0) and maps[:, 8:, :].max() == 0 and maps[:, :, :-8].max() == 0
    lungs = np.zeros((3, 32, 32), bool)
    lungs[:, 12:28, 4:28] = True
    assert np.allclose(lung_focus_fraction(maps, lungs), 0.0)  # all the mass outside the "lungs"


def test_nothing_to_attribute_gives_empty_maps_and_overlapping_patches_cover_every_pixel() -> None:
    images = np.random.default_rng(0).uniform(0, 1, (2, 30, 30)).astype(np.float32)
    assert occlusion_saliency(lambda x: np.full(len(x), 0.3), images).max() == 0.0  # a constant model: nothing lowers it
    assert occlusion_positions(30, 8, 4) == [0, 4, 8, 12, 16, 20, 22]  # the last patch flush with the edge
    brightness = occlusion_saliency(lambda x: x.mean(axis=(1, 2)), images, patch=8, stride=4)
    assert (brightness > 0).all()  # every pixel is covered and darkening anywhere lowers a brightness score
    with pytest.raises(CovidCXRError, match=r"\(N, H, W\)"):
        occlusion_saliency(corner_score, images[0])
