"""Raster reading (PNG/JPEG/TIFF/BMP), its errors and the decompression-bomb guard, and masks."""

from __future__ import annotations

import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidcxr.errors import ImageReadError
from covidcxr.io import DEFAULT_MAX_PIXELS, CXRImage, read_image, read_mask


def _png_bytes(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG built chunk by chunk, so its IHDR may claim any size whatever the IDAT holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _save(path: Path, array: np.ndarray, pillow_format: str, mode: str | None = None, **options) -> Path:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, format=pillow_format, **options)
    return path


def _assert_unit_grey(image: CXRImage, shape: tuple[int, int]) -> None:
    assert isinstance(image, CXRImage)
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == shape
    assert (image.metadata.height, image.metadata.width) == shape
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0


GREY_8 = np.array([[0, 1, 128], [200, 254, 255]], np.uint8)
GREY_16 = np.array([[0, 1, 32768], [40000, 65534, 65535]], np.uint16)


# --- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pillow_format", "name"), [("PNG", "png"), ("TIFF", "tiff"), ("BMP", "bmp")])
def test_8bit_grey_is_divided_by_255_exactly(tmp_path, pillow_format: str, name: str) -> None:
    image = read_image(_save(tmp_path / f"grey.{name}", GREY_8, pillow_format))
    _assert_unit_grey(image, GREY_8.shape)
    np.testing.assert_array_equal(image.pixels, GREY_8.astype(np.float32) / np.float32(255))
    assert image.metadata.format == name and image.metadata.bits_stored == 8


@pytest.mark.parametrize(
    ("pillow_format", "dtype"), [("PNG", np.uint16), ("TIFF", np.uint16), ("TIFF", np.dtype(">u2"))]
)
def test_16bit_grey_is_divided_by_65535_exactly(tmp_path, pillow_format: str, dtype) -> None:
    path = _save(tmp_path / "grey16.img", GREY_16.astype(dtype), pillow_format)
    image = read_image(path)
    _assert_unit_grey(image, GREY_16.shape)
    np.testing.assert_array_equal(image.pixels, GREY_16.astype(np.float32) / np.float32(65535))
    assert image.pixels[0, 2] == np.float32(32768 / 65535)
    assert image.metadata.bits_stored == 16


def test_rgb_becomes_itu601_luminance(tmp_path) -> None:
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[0, 3] = (255, 255, 255)
    image = read_image(_save(tmp_path / "rgb.png", rgb, "PNG"))
    _assert_unit_grey(image, (1, 4))
    np.testing.assert_allclose(image.pixels[0], [0.299, 0.587, 0.114, 1.0], atol=1 / 255)


def test_rgba_drops_alpha(tmp_path) -> None:
    rgba = np.full((2, 2, 4), 200, np.uint8)
    rgba[..., 3] = [[0, 255], [128, 10]]  # whatever the alpha, grey 200 stays 200
    image = read_image(_save(tmp_path / "rgba.png", rgba, "PNG"))
    _assert_unit_grey(image, (2, 2))
    np.testing.assert_array_equal(image.pixels, np.float32(200) / np.float32(255))


def test_palette_la_and_bilevel_images(tmp_path) -> None:
    palette = read_image(_save(tmp_path / "p.png", GREY_8, "PNG", mode="P", transparency=0))
    np.testing.assert_array_equal(palette.pixels, GREY_8.astype(np.float32) / np.float32(255))

    grey_alpha = read_image(_save(tmp_path / "la.png", GREY_8, "PNG", mode="LA"))
    np.testing.assert_array_equal(grey_alpha.pixels, GREY_8.astype(np.float32) / np.float32(255))

    bilevel = read_image(_save(tmp_path / "one.png", np.array([[0, 255, 0]], np.uint8), "PNG", mode="1"))
    np.testing.assert_array_equal(bilevel.pixels, [[0.0, 1.0, 0.0]])
    assert bilevel.metadata.bits_stored == 1
    for image in (palette, grey_alpha, bilevel):
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2


def test_jpeg_grey_and_colour_by_content_not_extension(tmp_path) -> None:
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    grey = read_image(_save(tmp_path / "looks_like.png", ramp, "JPEG", quality=95))
    _assert_unit_grey(grey, ramp.shape)
    assert grey.metadata.format == "jpeg"  # the name says PNG, the content says JPEG
    np.testing.assert_allclose(grey.pixels, ramp / 255.0, atol=4 / 255)

    colour = read_image(_save(tmp_path / "colour.jpg", np.stack([ramp] * 3, axis=-1), "JPEG", quality=95))
    _assert_unit_grey(colour, ramp.shape)
    np.testing.assert_allclose(colour.pixels, ramp / 255.0, atol=4 / 255)


def test_rgb_bmp_and_tiff(tmp_path) -> None:
    rgb = np.stack([GREY_8] * 3, axis=-1)
    for pillow_format in ("BMP", "TIFF"):
        image = read_image(_save(tmp_path / f"rgb.{pillow_format}", rgb, pillow_format))
        np.testing.assert_array_equal(image.pixels, GREY_8.astype(np.float32) / np.float32(255))


def test_raster_metadata_has_no_dicom_fields(tmp_path) -> None:
    meta = read_image(_save(tmp_path / "grey.png", GREY_8, "PNG")).metadata
    as_dict = meta.to_dict()
    assert as_dict["format"] == "png" and (as_dict["width"], as_dict["height"]) == (3, 2)
    assert as_dict["view"] == "unknown" and as_dict["sex"] is None and np.isnan(as_dict["age"])
    assert as_dict["photometric"] is None and as_dict["modality"] is None and as_dict["window"] is None


# --- errors ------------------------------------------------------------------------------


def _read_error(path: Path, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as caught:
        read_image(path, **kwargs)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)
    return caught.value


def test_missing_file(tmp_path) -> None:
    assert "file does not exist" in _read_error(tmp_path / "nowhere.png").reason


def test_directory(tmp_path) -> None:
    assert "not a regular file" in _read_error(tmp_path).reason


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _read_error(path).reason == "empty file"


def test_text_file_named_png(tmp_path) -> None:
    path = tmp_path / "text.png"
    path.write_text("this is not an image\n")
    assert _read_error(path).reason == "not an image: content is not PNG, JPEG, TIFF, BMP or DICOM"


def test_truncated_png(tmp_path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    whole = _save(tmp_path / "whole.png", noise, "PNG").read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(whole[: len(whole) // 2])
    assert _read_error(path).reason.startswith("truncated or corrupt PNG: ")


def test_truncated_jpeg(tmp_path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    whole = _save(tmp_path / "whole.jpg", noise, "JPEG").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    assert _read_error(path).reason.startswith("truncated or corrupt JPEG: ")


def test_huge_png_header_is_rejected_before_decoding(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(20000, 20000))  # 400 MP claimed, a few bytes of data
    started = time.perf_counter()
    error = _read_error(path)
    assert time.perf_counter() - started < 1.0
    assert error.reason.startswith("image is too large, rejected before decoding (decompression-bomb guard)")


def test_our_limit_applies_below_pillows(tmp_path) -> None:
    # 110 MP: over our 100 MP limit, under Pillow's error threshold (~179 MP), over its
    # warning threshold (~89 MP): our check decides and Pillow's warning does not leak.
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(11000, 10000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = _read_error(path)
    assert error.reason == "image is 11000x10000 = 110 MP, over the 100 MP limit (decompression-bomb guard)"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_max_pixels_is_configurable(tmp_path) -> None:
    path = _save(tmp_path / "small.png", GREY_8, "PNG")
    assert "image is 3x2 = 6e-06 MP, over the 5e-06 MP limit" in _read_error(path, max_pixels=5).reason
    assert read_image(path, max_pixels=6).pixels.shape == (2, 3)


def test_multi_frame_tiff(tmp_path) -> None:
    path = tmp_path / "pages.tiff"
    frames = [Image.fromarray(np.full((4, 4), value, np.uint8)) for value in (0, 100, 200)]
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:])
    assert _read_error(path).reason == "multi-frame image (3 frames); expected a single frame"


def test_png_with_bad_crc(tmp_path) -> None:
    data = bytearray(_save(tmp_path / "ok.png", GREY_8, "PNG").read_bytes())
    data[29] ^= 0xFF  # inside IHDR's CRC
    path = tmp_path / "bad_crc.png"
    path.write_bytes(bytes(data))
    assert "PNG" in _read_error(path).reason


def test_32bit_integer_tiff_within_16_bits_is_read_as_16_bit(tmp_path) -> None:
    image = read_image(_save(tmp_path / "int32.tiff", GREY_16.astype(np.int32), "TIFF"))
    np.testing.assert_array_equal(image.pixels, GREY_16.astype(np.float32) / np.float32(65535))
    too_wide = _save(tmp_path / "wide.tiff", np.array([[0, 70000]], np.int32), "TIFF")
    assert "outside 0-65535" in _read_error(too_wide).reason


def test_float_tiff_is_refused_clearly(tmp_path) -> None:
    path = _save(tmp_path / "float.tiff", np.zeros((2, 2), np.float32), "TIFF")
    assert "mode 'F'" in _read_error(path).reason


# --- masks -------------------------------------------------------------------------------


def test_mask_0_255_and_0_1(tmp_path) -> None:
    expected = np.array([[0, 1, 1], [0, 0, 1]], bool)
    from_255 = read_mask(_save(tmp_path / "m255.png", expected.astype(np.uint8) * 255, "PNG"), shape=(2, 3))
    from_01 = read_mask(_save(tmp_path / "m01.png", expected.astype(np.uint8), "PNG"))
    from_bilevel = read_mask(_save(tmp_path / "m1.png", expected.astype(np.uint8) * 255, "PNG", mode="1"))
    for mask in (from_255, from_01, from_bilevel):
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, expected)


def test_mask_threshold_is_half_range(tmp_path) -> None:
    mask = read_mask(_save(tmp_path / "soft.png", np.array([[0, 127, 128, 255]], np.uint8), "PNG"))
    np.testing.assert_array_equal(mask, [[False, False, True, True]])
    assert not read_mask(_save(tmp_path / "blank.png", np.zeros((2, 2), np.uint8), "PNG")).any()


def test_mask_shape_mismatch(tmp_path) -> None:
    path = _save(tmp_path / "mask.png", np.zeros((2, 3), np.uint8), "PNG")
    with pytest.raises(ImageReadError) as caught:
        read_mask(path, shape=(4, 4))
    assert str(path) in str(caught.value)
    assert "(2, 3)" in caught.value.reason and "(4, 4)" in caught.value.reason
    assert "masks must be the size of their image" in caught.value.reason
