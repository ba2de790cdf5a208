"""Compressed DICOM transfer syntaxes decode out of the box (pylibjpeg + libjpeg/openjpeg/rle).

The fixtures are made here: JPEG Lossless (1.2.840.10008.1.2.4.70 and .57) with GDCM's
encoder (pydicom has none for them), JPEG-LS (pyjpegls), JPEG 2000 (OpenJPEG) and RLE
through `pydicom.dataset.Dataset.compress`. Decoding goes through `covidcxr.io.read_image`,
which uses pydicom's decoders, i.e. the installed plugins, and through the pylibjpeg plugin
alone (the one the package depends on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, UID

from covidcxr.io import read_image
from covidcxr.io.writers import write_dicom

JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")


def _pixels() -> np.ndarray:
    rows, cols = np.mgrid[0:96, 0:80]
    return ((rows * 37 + cols * 11) % 4096).astype(np.uint16)


def compress_with_gdcm(source: Path, target: Path, syntax: UID) -> Path:
    """Re-encode ``source`` as JPEG Lossless with GDCM (the only encoder at hand for .57/.70)."""
    gdcm = pytest.importorskip("gdcm")
    names = {JPEGLosslessSV1: "JPEGLosslessProcess14_1", JPEG_LOSSLESS_P14: "JPEGLosslessProcess14"}
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, names[syntax])))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG_LOSSLESS_P14, JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=lambda u: u.keyword or str(u))
def test_compressed_dicom_decodes_like_the_uncompressed_file(tmp_path: Path, syntax: UID) -> None:
    import pydicom

    pixels = _pixels()
    raw = write_dicom(tmp_path / "raw.dcm", pixels, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)
    target = tmp_path / "compressed"  # extension-less, as PACS exports write them
    if syntax in (JPEGLosslessSV1, JPEG_LOSSLESS_P14):
        compress_with_gdcm(raw, target, syntax)
    else:
        dataset = pydicom.dcmread(raw)
        dataset.compress(syntax)
        dataset.save_as(target)
    assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    expected = read_image(raw)
    decoded = read_image(target)
    assert decoded.metadata.format == "dicom"
    np.testing.assert_array_equal(decoded.pixels, expected.pixels)  # lossless: identical
    # the runtime dependency itself (pylibjpeg and its plugins) decodes it, whatever else
    # (GDCM, from the test extras) pydicom would try first
    np.testing.assert_array_equal(pixel_array(target, decoding_plugin="pylibjpeg"), pixels)
