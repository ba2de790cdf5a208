"""PreprocessConfig validation and hashing; the pipeline on phantoms with exact masks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from covidcxr.data.synth import synthesize
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.io import read_mask
from covidcxr.preprocess.pipeline import (
    PIPELINE_VERSION,
    PreprocessConfig,
    PreprocessConfigError,
    lung_statistics,
    preprocess_batch,
    preprocess_image,
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """12 phantoms of 80 px with exact lung masks."""
    return synthesize(tmp_path_factory.mktemp("phantoms"), n_images=12, size=80, seed=1)


class BoxSegmenter:
    """A stand-in for the U-Net: two fixed rectangular 'lungs', counting its calls."""

    def __init__(self, fraction: float = 0.6):
        self.fraction = fraction
        self.calls: list[int] = []

    def segment_batch(self, images):
        self.calls.append(len(images))
        masks = []
        for image in images:
            h, w = image.shape
            mask = np.zeros((h, w), bool)
            top, bottom = int(h * (0.5 - self.fraction / 2)), int(h * (0.5 + self.fraction / 2))
            left, right = int(w * (0.5 - self.fraction / 2)), int(w * (0.5 + self.fraction / 2))
            mask[top:bottom, left : (left + right) // 2 - 1] = True
            mask[top:bottom, (left + right) // 2 + 1 : right] = True
            masks.append(mask)
        return masks


def _has_soften_mask() -> bool:
    try:
        from covidcxr.preprocess.lungs import soften_mask  # noqa: F401
    except ImportError:
        return False
    return True


needs_soften = pytest.mark.skipif(not _has_soften_mask(), reason="covidcxr.preprocess.lungs.soften_mask is not there yet")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [("jpeg_quality", 101), ("lungs", "lungs-only"), ("size", "big"), ("blur_radius", -1), ("crop_min_fraction", 0.0), ("pad_value", 2)],
)
def test_config_validation_error_names_the_field(field, value):
    with pytest.raises(ValidationError) as caught:
        PreprocessConfig(**{field: value})
    assert field in str(caught.value)
    with pytest.raises(PreprocessConfigError) as friendly:
        PreprocessConfig.from_mapping({field: value}, origin="recipe.yaml")
    assert friendly.value.fields == [field]
    assert f"field '{field}'" in str(friendly.value) and "recipe.yaml" in str(friendly.value)


def test_config_refuses_unknown_fields_and_is_frozen():
    with pytest.raises(PreprocessConfigError, match="blurr_radius"):
        PreprocessConfig.from_mapping({"blurr_radius": 3})
    config = PreprocessConfig()
    with pytest.raises(ValidationError):
        config.lungs = "crop"


def test_config_defaults_and_size_forms():
    config = PreprocessConfig()
    assert (config.equalization, config.lungs, config.mask_source, config.jpeg_quality) == ("histogram", "mask", "model", None)
    assert config.size == (224, 224) and config.blur_radius == 3.0 and config.crop_min_fraction == 0.5
    assert PreprocessConfig(size=256).size == (256, 256)
    assert PreprocessConfig(size="200x266").size == (200, 266)
    assert PreprocessConfig(size=[200, 266]).size == (200, 266)


ALTERNATIVES = {
    "equalization": "clahe",
    "jpeg_quality": 90,
    "lungs": "crop",
    "mask_source": "manifest",
    "blur_radius": 2.5,
    "crop_margin": 0.1,
    "crop_min_fraction": 0.4,
    "size": (200, 266),
    "pad_value": 0.5,
    "segmenter_weights": "other.pt",
}


def test_config_hash_changes_with_every_field():
    assert set(ALTERNATIVES) == set(PreprocessConfig.model_fields)
    base = PreprocessConfig().config_hash()
    hashes = {field: PreprocessConfig(**{field: value}).config_hash() for field, value in ALTERNATIVES.items()}
    assert base not in hashes.values() and len(set(hashes.values())) == len(hashes)
    # the same values given differently hash the same
    assert PreprocessConfig(size=224, blur_radius=3).config_hash() == base
    assert str(PIPELINE_VERSION) in PreprocessConfig().canonical_json()


def test_config_hash_follows_the_segmenter_weights_content(tmp_path):
    from covidcxr.preprocess.lungs import DEFAULT_WEIGHTS

    weights = tmp_path / "lung_unet.pt"
    weights.write_bytes(DEFAULT_WEIGHTS.read_bytes())
    (tmp_path / "lung_unet.json").write_bytes(DEFAULT_WEIGHTS.with_suffix(".json").read_bytes())
    before = PreprocessConfig(segmenter_weights=str(weights)).config_hash()
    manifest_masks = PreprocessConfig(mask_source="manifest", segmenter_weights=str(weights)).config_hash()
    weights.write_bytes(weights.read_bytes() + b"retrained")  # same name, new content
    assert PreprocessConfig(segmenter_weights=str(weights)).config_hash() != before
    changed = PreprocessConfig(segmenter_weights=str(weights)).config_hash()
    metadata = tmp_path / "lung_unet.json"
    metadata.write_text(metadata.read_text().replace('"tta": "none"', '"tta": "multiscale"'))
    assert PreprocessConfig(segmenter_weights=str(weights)).config_hash() != changed  # the TTA preset changes masks
    # manifest masks never touch the model: its weights do not enter the hash
    assert PreprocessConfig(mask_source="manifest", segmenter_weights=str(weights)).config_hash() == manifest_masks


def test_config_hash_is_stable_across_processes():
    config = PreprocessConfig(lungs="crop", size=(200, 266), jpeg_quality=90)
    code = (
        "from covidcxr.preprocess.pipeline import PreprocessConfig;"
        "print(PreprocessConfig(jpeg_quality=90, size='200x266', lungs='crop').config_hash())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == config.config_hash()


def test_config_yaml_round_trip(tmp_path):
    config = PreprocessConfig(lungs="crop", size=(200, 266), jpeg_quality=90, segmenter_weights="w.pt")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert PreprocessConfig.from_yaml(path) == config
    assert PreprocessConfig.from_yaml(path, lungs="none").lungs == "none"
    path.write_text("lungs: crop\njpeg_quality: 0\n")
    with pytest.raises(PreprocessConfigError, match="jpeg_quality"):
        PreprocessConfig.from_yaml(path)


# ---------------------------------------------------------------- pipeline


def test_lung_statistics():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 1:4] = True  # image-left lung, 18 px
    mask[2:8, 6:8] = True  # image-right lung, 12 px
    assert lung_statistics(mask) == (0.3, 0.6)
    one_piece = np.zeros((10, 10), bool)
    one_piece[2:8, 1:9] = True  # merged lungs: split at the middle column
    assert lung_statistics(one_piece)[1] == pytest.approx(0.5)
    area, balance = lung_statistics(np.zeros((4, 4), bool))
    assert area == 0.0 and np.isnan(balance)


@pytest.mark.parametrize("lungs", ["crop", "none", "mask"])
def test_pipeline_on_phantoms_with_manifest_masks(phantoms, lungs):
    if lungs == "mask" and not _has_soften_mask():
        pytest.skip("covidcxr.preprocess.lungs.soften_mask is not there yet")
    config = PreprocessConfig(lungs=lungs, mask_source="manifest", size=(96, 128))
    for row in phantoms.head(4).itertuples():
        out = preprocess_image(row.image, config, manifest_mask=row.mask)
        assert out.image.shape == (96, 128) and out.image.dtype == np.float32
        assert 0.0 <= out.image.min() and out.image.max() <= 1.0
        assert out.lung_mask.shape == (96, 128) and out.lung_mask.dtype == bool
        assert out.rejected_reason is None and out.mask_used == "manifest"
        exact = read_mask(row.mask)
        assert out.mask_area_fraction == pytest.approx(exact.mean(), abs=1e-6)
        assert 0.35 < out.left_right_balance < 0.65
        assert out.original.shape == out.original_mask.shape and max(out.original.shape) == 192
        if lungs == "crop":
            assert out.crop_box is not None and out.crop_box.area < exact.size
            assert out.lung_mask.mean() > exact.mean()  # the lungs fill more of the input
        else:
            # the phantom is square: it fills the 96 rows, padding sits left and right
            assert out.transform.content_shape == (96, 96) and out.transform.left == 16
            assert out.crop_box is None
        if lungs == "mask":
            # nothing survives farther than the blur radius outside the (resized) lungs
            from scipy import ndimage

            near = ndimage.binary_dilation(out.lung_mask, structure=np.ones((3, 3), bool), iterations=4)
            assert np.all(out.image[~near] == 0.0) and out.image[out.lung_mask].mean() > 0.05
        if lungs == "none":
            assert out.image[:, 20:108].std() > 0.1 and np.count_nonzero(out.image[~out.lung_mask]) > 1000


def test_hard_mask_with_zero_blur(phantoms):
    config = PreprocessConfig(lungs="mask", mask_source="manifest", blur_radius=0, size=80)
    row = phantoms.iloc[0]
    out = preprocess_image(row["image"], config, manifest_mask=row["mask"])
    assert np.all(out.image[~out.lung_mask] == 0.0)
    np.testing.assert_array_equal(out.lung_mask, read_mask(row["mask"]))  # same size: no resampling


def test_segmenter_runs_once_per_batch(phantoms):
    segmenter = BoxSegmenter()
    config = PreprocessConfig(lungs="crop", mask_source="model")
    items = [(row.image, row.mask) for row in phantoms.head(5).itertuples()]
    results = preprocess_batch(items, config, segmenter)
    assert segmenter.calls == [5]
    assert all(r.mask_used == "model" and r.rejected_reason is None for r in results)


def test_auto_uses_the_manifest_mask_where_present(phantoms):
    segmenter = BoxSegmenter()
    config = PreprocessConfig(lungs="none", mask_source="auto", size=64)
    rows = phantoms.head(3)
    items = [(rows.iloc[0]["image"], rows.iloc[0]["mask"]), (rows.iloc[1]["image"], None), (rows.iloc[2]["image"], rows.iloc[2]["mask"])]
    results = preprocess_batch(items, config, segmenter)
    assert [r.mask_used for r in results] == ["manifest", "model", "manifest"]
    assert segmenter.calls == [1]


def test_manifest_source_without_a_mask_is_an_error(phantoms):
    config = PreprocessConfig(mask_source="manifest", lungs="none")
    with pytest.raises(CovidCXRError, match="no lung mask in the manifest"):
        preprocess_image(phantoms.iloc[0]["image"], config)


def test_failed_segmentation_is_rejected_with_its_reason(phantoms):
    config = PreprocessConfig(lungs="crop", mask_source="model", size=64)
    out = preprocess_image(phantoms.iloc[0]["image"], config, segmenter=BoxSegmenter(fraction=0.2))
    assert out.rejected_reason is not None and "too small" in out.rejected_reason
    assert out.image.shape == (64, 64)  # still returned (uncropped) so QC can show it
    empty = type("Empty", (), {"segment_batch": lambda self, images: [np.zeros(i.shape, bool) for i in images]})()
    for lungs in ("crop", "mask"):
        out = preprocess_image(phantoms.iloc[0]["image"], PreprocessConfig(lungs=lungs, size=64), segmenter=empty)
        assert "empty lung mask" in out.rejected_reason
    assert preprocess_image(phantoms.iloc[0]["image"], PreprocessConfig(lungs="none", size=64), segmenter=empty).rejected_reason is None


def test_jpeg_harmonisation_changes_the_input(phantoms):
    row = phantoms.iloc[0]
    plain = preprocess_image(row["image"], PreprocessConfig(lungs="none", mask_source="manifest"), manifest_mask=row["mask"])
    jpeg = preprocess_image(row["image"], PreprocessConfig(lungs="none", mask_source="manifest", jpeg_quality=50), manifest_mask=row["mask"])
    assert 0 < np.abs(plain.image - jpeg.image).mean() < 0.1


def test_unreadable_image_raises_and_batch_reports_it(phantoms, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    config = PreprocessConfig(lungs="none", mask_source="model", size=64)
    with pytest.raises(ImageReadError):
        preprocess_image(broken, config, segmenter=BoxSegmenter())
    results = preprocess_batch([(broken, None), (phantoms.iloc[0]["image"], None)], config, BoxSegmenter())
    assert isinstance(results[0], ImageReadError) and str(broken) in str(results[0])
    assert results[1].image.shape == (64, 64)


# ---------------------------------------------------------------- downscale first (working resolution)


@pytest.mark.parametrize(
    ("shape", "settings", "expected"),
    [
        ((1024, 1024), {"size": 224}, (256, 256)),  # the U-Net's 256 px input is the floor
        ((2000, 1000), {"size": 512}, (512, 256)),  # the model input's own scale when above it
        ((2000, 1600), {"size": 224, "lungs": "crop"}, (448, 358)),  # crop: a crop of half the side keeps 224 px
        ((320, 250), {"size": 224, "lungs": "crop"}, (320, 250)),  # never upscaled
        ((200, 150), {"size": 224}, (200, 150)),
    ],
)
def test_working_shape(shape, settings, expected):
    from covidcxr.preprocess.pipeline import working_shape

    assert working_shape(shape, PreprocessConfig(**settings)) == expected


@pytest.mark.parametrize("lungs", ["mask", "crop"])
def test_a_large_image_gives_what_its_area_downscaled_copy_gives(lungs):
    """Downscale first: a 1024-px film and its box-filtered working-size copy are the same model input."""
    from covidcxr.preprocess.pipeline import downscale, working_shape

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024] / 1024.0
    large = np.clip(0.5 + 0.3 * np.sin(9 * xx) * np.cos(7 * yy) + 0.05 * rng.standard_normal((1024, 1024)), 0, 1).astype(np.float32)
    config = PreprocessConfig(size=96, lungs=lungs, crop_min_fraction=0.3)
    small = downscale(large, working_shape(large.shape, config))
    segmenter = BoxSegmenter()
    big_result, small_result = preprocess_batch([(large, None), (small, None)], config, segmenter)
    assert segmenter.calls == [2]
    assert big_result.input_shape == (1024, 1024) and small_result.input_shape == small.shape
    np.testing.assert_array_equal(big_result.image, small_result.image)
    np.testing.assert_array_equal(big_result.lung_mask, small_result.lung_mask)
    assert big_result.mask_area_fraction == small_result.mask_area_fraction
    if lungs == "crop":  # the crop box is reported in the coordinates of the image as read
        scale = 1024 / small.shape[0]
        assert big_result.crop_box.top == round(small_result.crop_box.top * scale)
        assert big_result.crop_box.bottom <= 1024


def test_the_segmenter_sees_the_working_resolution_not_the_file(phantoms):
    """A 2,000-px film costs the U-Net what a 256-px one does (the masks come back at that size)."""
    seen: list[tuple[int, int]] = []

    class Recording(BoxSegmenter):
        def segment_batch(self, images):
            seen.extend(image.shape for image in images)
            return super().segment_batch(images)

    big = np.tile(np.linspace(0, 1, 2000, dtype=np.float32), (1600, 1))
    (result,) = preprocess_batch([(big, None)], PreprocessConfig(size=224), Recording())
    assert seen == [(205, 256)]
    assert result.image.shape == (224, 224) and result.input_shape == (1600, 2000)


def test_manifest_masks_follow_the_image_to_the_working_resolution(tmp_path):
    from covidcxr.io.writers import write_png

    image = np.tile(np.linspace(0, 1, 600, dtype=np.float32), (600, 1))
    mask = np.zeros((600, 600), bool)
    mask[100:500, 60:280] = mask[100:500, 320:540] = True
    write_png(tmp_path / "i.png", image)
    write_png(tmp_path / "m.png", mask.astype(np.float32))
    config = PreprocessConfig(size=128, mask_source="manifest")
    result = preprocess_image(tmp_path / "i.png", config, manifest_mask=tmp_path / "m.png")
    assert result.mask_area_fraction == pytest.approx(mask.mean(), abs=0.01)
    assert result.input_shape == (600, 600)


def test_screening_still_refuses_a_large_graphic_that_downscaling_would_blur():
    """Area averaging turns a 3,000-px checkerboard's 2 levels into hundreds; screening looks at a strided sample."""
    from covidcxr.serve.errors import NotAChestXray

    n = 3001
    checker = ((np.indices((n, n)) // 37).sum(0) % 2).astype(np.float32)
    noise = np.clip(0.5 + 0.2 * np.random.default_rng(0).standard_normal((n, n)), 0, 1).astype(np.float32)
    refused, kept = preprocess_batch([(checker, None), (noise, None)], PreprocessConfig(), BoxSegmenter(), screen=True)
    assert isinstance(refused, NotAChestXray) and "grey levels" in str(refused)
    assert kept.image.shape == (224, 224)
