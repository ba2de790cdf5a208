import numpy as np
import pytest

from covidcxr.audit.ablation import blank_lungs, keep_lungs_only
from covidcxr.errors import CovidCXRError


def _square():
    images = np.full((2, 20, 20), 0.7, dtype=np.float32)
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[:, 8:12, 8:12] = True
    return images, masks


def test_blank_lungs_sets_the_dilated_mask_to_the_fill_value():
    images, masks = _square()
    out = blank_lungs(images, masks, fill=0.0, dilation=2)
    assert out[0, 6:14, 6:14].max() == 0.0  # the 4x4 lung grown by 2 px each side
    assert out[0, 5, 5] == pytest.approx(0.7) and out[0, 14, 14] == pytest.approx(0.7)
    assert (out == 0).sum() == 2 * 8 * 8  # a 3x3 square structuring element, twice: 4x4 -> 8x8
    assert images[0, 9, 9] == pytest.approx(0.7)  # the input is not modified


def test_keep_lungs_only_zeroes_everything_else():
    images, masks = _square()
    out = keep_lungs_only(images, masks)
    assert out[masks].min() == pytest.approx(0.7)
    assert out[~masks].max() == 0.0


def test_ablation_shapes_are_checked():
    images, masks = _square()
    with pytest.raises(CovidCXRError, match="must both be"):
        blank_lungs(images, masks[:, :10])
