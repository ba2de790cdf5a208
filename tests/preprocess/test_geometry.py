"""Lung masking, lung cropping with rejection, and aspect-preserving resize with padding."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.geometry import (
    BoundingBox,
    CropRejected,
    apply_lung_mask,
    crop_to_lungs,
    lung_bounding_box,
    make_pad_transform,
    resize_with_padding,
)


def _two_lungs(shape=(100, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[20:80, 15:45] = True
    mask[20:80, 55:85] = True
    return mask


def test_mask_zeros_the_outside_and_keeps_the_inside():
    rng = np.random.default_rng(0)
    image = rng.random((100, 100)).astype(np.float32)
    mask = _two_lungs()
    out = apply_lung_mask(image, mask)
    assert out.dtype == np.float32
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_array_equal(out[mask], image[mask])
    soft = np.where(mask, 1.0, 0.0).astype(np.float32)
    soft[50, 14] = 0.5  # a blurred edge pixel is scaled, not cut
    assert apply_lung_mask(image, soft)[50, 14] == pytest.approx(image[50, 14] * 0.5)


def test_mask_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        apply_lung_mask(np.zeros((4, 4)), np.zeros((4, 5)))


def test_bounding_box_with_margin_is_clipped_to_the_image():
    mask = np.zeros((10, 10), bool)
    mask[0:3, 6:10] = True
    assert lung_bounding_box(mask).as_tuple() == (0, 6, 3, 10)
    assert lung_bounding_box(mask, margin=2).as_tuple() == (0, 4, 5, 10)
    assert lung_bounding_box(np.zeros((5, 5), bool)) is None


def test_crop_keeps_the_lungs_with_a_margin():
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    crop, box = crop_to_lungs(image, _two_lungs(), margin_fraction=0.05)
    # tight box rows 20:80 (60), cols 15:85 (70); margins ceil(3.0)=3 rows, ceil(3.5)=4 cols
    assert box == BoundingBox(17, 11, 83, 89)
    np.testing.assert_array_equal(crop, image[17:83, 11:89])


def test_crop_rejects_an_empty_mask_with_its_reason():
    with pytest.raises(CropRejected) as caught:
        crop_to_lungs(np.ones((50, 50)), np.zeros((50, 50), bool))
    assert "empty lung mask" in caught.value.reason
    assert isinstance(caught.value, CovidCXRError)


def test_crop_rejects_a_tiny_mask_with_its_reason():
    mask = np.zeros((100, 100), bool)
    mask[40:50, 40:60] = True
    with pytest.raises(CropRejected) as caught:
        crop_to_lungs(np.ones((100, 100)), mask)
    assert "too small" in caught.value.reason and "100x100" in caught.value.reason


def test_crop_rule_is_per_side_not_per_area():
    # 60% of each side = 36% of the area: a plausible lung field, kept (side rule) ...
    mask = np.zeros((100, 100), bool)
    mask[20:80, 20:80] = True
    _, box = crop_to_lungs(np.ones((100, 100)), mask, margin_fraction=0.0)
    assert box.area / 100**2 == pytest.approx(0.36)
    # ... while a full-width but 40%-high box is rejected, although its area is 40%.
    flat = np.zeros((100, 100), bool)
    flat[30:70, :] = True
    with pytest.raises(CropRejected, match="too small"):
        crop_to_lungs(np.ones((100, 100)), flat, margin_fraction=0.0)


def test_resize_with_padding_keeps_the_aspect_ratio_centred():
    image = np.ones((100, 200), np.float32)
    out, transform = resize_with_padding(image, (200, 266), pad_value=0.0)
    assert out.shape == (200, 266) and out.dtype == np.float32
    assert transform.content_shape == (133, 266)
    assert (transform.top, transform.left) == (33, 0)
    content = transform.content_box
    assert np.allclose(out[content.slices], 1.0)
    assert np.all(out[: content.top] == 0.0) and np.all(out[content.bottom :] == 0.0)
    assert content.bottom == 166 and 200 - content.bottom in (content.top, content.top + 1)


def test_resize_pads_with_the_pad_value():
    out, transform = resize_with_padding(np.zeros((50, 25), np.float32), (64, 64), pad_value=0.25)
    assert transform.content_shape == (64, 32) and transform.left == 16
    assert np.all(out[:, :16] == 0.25) and np.all(out[:, 48:] == 0.25) and np.all(out[:, 16:48] == 0.0)


def test_mask_stays_binary_and_aligned_with_its_image():
    mask = _two_lungs((90, 120))
    image = mask.astype(np.float32)
    out_image, transform = resize_with_padding(image, (224, 224))
    out_mask = transform.apply(mask)
    assert out_mask.dtype == bool and out_mask.shape == (224, 224)
    direct, _ = resize_with_padding(mask, (224, 224))
    np.testing.assert_array_equal(direct, out_mask)
    # the resized mask covers the bright resized lungs (up to the resampling of edges)
    assert np.mean(out_image[out_mask] > 0.5) > 0.97
    assert np.mean(out_image[~out_mask] < 0.5) > 0.97
    assert out_mask.mean() == pytest.approx(mask.mean() * (168 / 224), rel=0.05)


def test_shrinking_is_anti_aliased():
    checker = (np.indices((400, 400)).sum(axis=0) % 2).astype(np.float32)
    out, _ = resize_with_padding(checker, (50, 50))
    # without a low-pass filter, point sampling would return all 0s or all 1s
    assert abs(float(out.mean()) - 0.5) < 0.05 and float(out.std()) < 0.05


def test_transform_maps_coordinates_both_ways():
    transform = make_pad_transform((100, 200), (200, 266))
    rows, cols = transform.to_output(np.array([0.0, 99.0]), np.array([0.0, 199.0]))
    back_rows, back_cols = transform.to_input(rows, cols)
    np.testing.assert_allclose(back_rows, [0.0, 99.0], atol=1e-9)
    np.testing.assert_allclose(back_cols, [0.0, 199.0], atol=1e-9)
    assert 33 <= rows[0] < 34 and 164 < rows[1] < 166  # first and last content rows
