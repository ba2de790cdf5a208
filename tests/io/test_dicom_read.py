"""DICOM reading (covidcxr.io.dicom): pixel pipeline, metadata, errors, and no identifier leaks."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import DigitalXRayImageStorageForPresentation, JPEGLSLossless

from covidcxr.errors import ImageReadError
from covidcxr.io import dicom_dataset, read_dicom, read_dicom_metadata, read_image

IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET123",
    "PatientBirthDate": "19660401",
    "AccessionNumber": "ACC98765",
    "InstitutionName": "Saint Nowhere Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20200317",
}
DEMOGRAPHICS = {"ViewPosition": "PA", "PatientSex": "F", "PatientAge": "058Y", "Modality": "DX"}


def make_dicom(
    path: Path,
    stored: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    *,
    preamble: bool = True,
    **elements: object,
) -> Path:
    """Write a DX DICOM holding ``stored`` (None: no Pixel Data) plus identifiers and ``elements``."""
    dataset = dicom_dataset(stored, photometric, bits_stored, **IDENTIFIERS, **DEMOGRAPHICS, **elements)
    if preamble:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.preamble = None
        dataset.save_as(path, enforce_file_format=False)
    return path


STORED = np.array([[0, 750, 1000], [1200, 3000, 4095]], np.uint16)


def test_monochrome1_window_and_rescale_match_the_dicom_formula(tmp_path) -> None:
    path = make_dicom(
        tmp_path / "mono1.dcm",
        STORED,
        "MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[1000, 40],  # several windows: the first is used
        WindowWidth=[2001, 80],
    )
    image = read_image(path)

    # By hand, PS3.3 C.11.2.1.2.1 (LINEAR): modality value m = 2 s - 1000; with c = 1000,
    # w = 2001: 0 if m <= c - 0.5 - (w-1)/2, 1 if m > c - 0.5 + (w-1)/2, otherwise
    # (m - (c - 0.5)) / (w - 1) + 0.5; then MONOCHROME1 gives 1 - that.
    # s:        0       750            1000            1200            3000  4095
    # m:    -1000       500            1000            1400            5000  7190
    # window:   0   0.25025         0.50025         0.70025               1     1
    expected = 1.0 - np.array([[0.0, 0.25025, 0.50025], [0.70025, 1.0, 1.0]])
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (2, 3)
    # MONOCHROME1: the brightest stored value is the darkest output, the lowest the whitest.
    assert image.pixels[1, 2] == image.pixels.min() == 0.0
    assert image.pixels[0, 0] == image.pixels.max() == 1.0

    meta = image.metadata
    assert meta.format == "dicom" and meta.photometric == "MONOCHROME1" and meta.modality == "DX"
    assert (meta.width, meta.height, meta.bits_stored) == (3, 2, 12)
    assert meta.window == (1000.0, 2001.0) and meta.voi == "window"
    assert (meta.view, meta.sex, meta.age) == ("PA", "F", 58.0)
    assert read_dicom_metadata(path) == meta


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # LINEAR_EXACT (C.11.2.1.3.2): (m - c) / w + 0.5, clipped.
        ("LINEAR_EXACT", [0.0, 0.3, 0.5, 0.7, 1.0]),
        # SIGMOID (C.11.2.1.3.1): 1 / (1 + exp(-4 (m - c) / w)).
        ("SIGMOID", 1 / (1 + np.exp(-4 * np.array([-1000, -200, 0, 200, 1000]) / 1000))),
    ],
)
def test_other_voi_functions_on_signed_pixels(tmp_path, function: str, expected) -> None:
    signed = np.array([[-1000, -200, 0, 200, 1000]], np.int16)
    path = make_dicom(
        tmp_path / "signed.dcm", signed, "MONOCHROME2", 16, WindowCenter=0, WindowWidth=1000, VOILUTFunction=function
    )
    np.testing.assert_allclose(read_image(path).pixels, [expected], atol=1e-6)


def test_monochrome2_voi_lut_sequence_wins_over_window(tmp_path) -> None:
    lut_item = Dataset()
    lut_item.add_new(0x00283002, "US", [4, 10, 16])  # LUT Descriptor: 4 entries, first maps 10, 16 bits
    lut_item.add_new(0x00283006, "US", [0, 1000, 40000, 65535])  # LUT Data
    stored = np.array([[9, 10, 11], [12, 13, 20]], np.uint16)
    path = make_dicom(
        tmp_path / "lut.dcm", stored, "MONOCHROME2", VOILUTSequence=[lut_item], WindowCenter=500, WindowWidth=10
    )
    image = read_image(path)
    # Below the first mapped value -> first entry, beyond the last -> last entry; / (2**16 - 1).
    expected = np.array([[0, 0, 1000], [40000, 65535, 65535]]) / 65535
    np.testing.assert_allclose(image.pixels, expected, atol=1e-7)
    assert image.metadata.voi == "lut" and image.metadata.window is None


def test_no_window_stretches_min_max(tmp_path) -> None:
    path = make_dicom(tmp_path / "plain.dcm", np.array([[100, 200], [300, 500]], np.uint16))
    image = read_image(path)
    np.testing.assert_allclose(image.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)
    assert image.metadata.voi == "min_max" and image.metadata.window is None
    assert read_dicom_metadata(path).voi == "min_max"


def test_constant_image_without_window_is_black_not_nan(tmp_path) -> None:
    image = read_image(make_dicom(tmp_path / "flat.dcm", np.full((2, 2), 7, np.uint16)))
    np.testing.assert_array_equal(image.pixels, np.zeros((2, 2), np.float32))


def test_invalid_window_width_falls_back_to_min_max_with_a_warning(tmp_path) -> None:
    path = make_dicom(tmp_path / "w0.dcm", np.array([[0, 10], [20, 40]], np.uint16), WindowCenter=20, WindowWidth=0)
    with pytest.warns(UserWarning, match="min-max"):
        image = read_image(path)
    np.testing.assert_allclose(image.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)
    assert image.metadata.voi == "min_max"


def test_rgb_and_ybr_dicoms_become_grey(tmp_path) -> None:
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (255, 255, 255)
    image = read_image(make_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8))
    np.testing.assert_allclose(image.pixels, [[0.299, 0.587, 1.0]], atol=1e-6)
    assert image.metadata.photometric == "RGB" and image.metadata.voi is None

    ybr = np.zeros((1, 3, 3), np.uint8)
    ybr[..., 0] = [0, 128, 255]  # luma; neutral chroma below
    ybr[..., 1:] = 128
    grey = read_image(make_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL", 8))
    np.testing.assert_allclose(grey.pixels, [[0.0, 128 / 255, 1.0]], atol=1.5 / 255)


def test_preamble_less_dicoms_are_read(tmp_path) -> None:
    # File meta but no preamble: the file starts with group 0002.
    with_meta = make_dicom(tmp_path / "no_preamble", np.array([[0, 4095]], np.uint16), preamble=False)
    assert with_meta.read_bytes()[:2] == b"\x02\x00"
    np.testing.assert_allclose(read_image(with_meta).pixels, [[0.0, 1.0]])

    # No preamble, no file meta, implicit VR: the file starts with group 0008.
    bare = Dataset()
    bare.SOPClassUID = DigitalXRayImageStorageForPresentation
    bare.ViewPosition = "AP"
    bare.set_pixel_data(np.array([[0, 2000, 4000]], np.uint16), "MONOCHROME2", 12)
    del bare.file_meta  # set_pixel_data adds one; this file must have none
    bare.save_as(tmp_path / "bare", implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"
    image = read_image(tmp_path / "bare")
    np.testing.assert_allclose(image.pixels, [[0.0, 0.5, 1.0]])
    assert image.metadata.view == "AP"
    assert read_dicom_metadata(tmp_path / "bare").view == "AP"


def _dicom_error(call, path: Path) -> ImageReadError:
    with pytest.raises(ImageReadError) as caught:
        call(path)
    assert str(path) in str(caught.value)
    return caught.value


def test_multi_frame_is_refused(tmp_path) -> None:
    path = make_dicom(tmp_path / "frames.dcm", np.zeros((2, 4, 4), np.uint16))
    for call in (read_image, read_dicom_metadata):
        assert _dicom_error(call, path).reason == "multi-frame DICOM (2 frames); expected a single radiograph"


def test_missing_pixel_data_is_refused(tmp_path) -> None:
    path = make_dicom(tmp_path / "header_only.dcm", None)
    assert _dicom_error(read_image, path).reason == "DICOM has no pixel data"
    assert read_dicom_metadata(path).width == 2  # the header alone is fine


def test_oversized_rows_columns_are_refused_before_decoding(tmp_path) -> None:
    path = make_dicom(tmp_path / "bomb.dcm", np.zeros((2, 2), np.uint16), Rows=20000, Columns=20000)
    assert _dicom_error(read_image, path).reason == (
        "image is 20000x20000 = 400 MP, over the 100 MP limit (decompression-bomb guard)"
    )


def test_truncated_pixel_data(tmp_path) -> None:
    whole = make_dicom(tmp_path / "whole.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole.read_bytes()[:-3000])
    _dicom_error(read_image, path)


def test_undecodable_transfer_syntax_is_named(tmp_path, monkeypatch) -> None:
    class Missing:  # the decoder plugins are dependencies now: simulate an install without them
        is_available = False
        missing_dependencies = ["pylibjpeg-libjpeg"]

    monkeypatch.setattr("covidcxr.io.dicom.get_decoder", lambda syntax: Missing())
    path = make_dicom(tmp_path / "jpegls.dcm", np.zeros((2, 2), np.uint16))
    from pydicom import dcmread

    dataset = dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    reason = _dicom_error(read_image, path).reason
    assert "JPEG-LS Lossless Image Compression" in reason and JPEGLSLossless in reason
    assert "no installed decoder" in reason


def test_non_dicom_given_to_dicom_readers(tmp_path) -> None:
    path = tmp_path / "text.dcm"
    path.write_text("plain text, no DICOM here")
    for call in (read_dicom, read_dicom_metadata):
        assert _dicom_error(call, path).reason.startswith("not a DICOM file")
    assert _dicom_error(read_dicom_metadata, tmp_path / "missing.dcm").reason == "file does not exist"


def test_identifiers_never_leak(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    good = make_dicom(tmp_path / "good.dcm", STORED, "MONOCHROME1", WindowCenter=2000, WindowWidth=4000)
    bad_window = make_dicom(tmp_path / "w0.dcm", STORED, WindowCenter=1, WindowWidth=0)
    frames = make_dicom(tmp_path / "frames.dcm", np.zeros((2, 2, 2), np.uint16))
    no_pixels = make_dicom(tmp_path / "no_pixels.dcm", None)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-5])

    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (good, bad_window):
            image = read_image(path)
            seen += [repr(image), str(image.metadata.to_dict()), repr(read_dicom_metadata(path))]
        for path in (frames, no_pixels, truncated):
            with pytest.raises(ImageReadError) as error:
                read_image(path)
            seen += [str(error.value), repr(error.value), str(error.value.__cause__)]
    seen += [str(w.message) for w in caught]
    seen.append(caplog.text)
    assert len(caught) >= 1  # the invalid window warned, so warnings were really inspected
    text = "\n".join(seen)
    for value in IDENTIFIERS.values():
        for part in value.split("^"):
            assert part not in text, f"identifier {part!r} leaked"
