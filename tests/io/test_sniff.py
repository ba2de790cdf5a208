"""Format sniffing from magic bytes (covidcxr.io.sniff)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from covidcxr.io import sniff_file, sniff_format


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(24), "png"),
        (b"\xff\xd8\xff\xe0" + bytes(16), "jpeg"),
        (b"II*\x00" + bytes(8), "tiff"),
        (b"MM\x00*" + bytes(8), "tiff"),
        (b"II+\x00" + bytes(8), "tiff"),  # BigTIFF
        (b"BM" + bytes(12) + struct.pack("<I", 40) + bytes(8), "bmp"),
        (bytes(128) + b"DICM" + bytes(16), "dicom"),
        # Preamble-less DICOM: (0002,0000) UL, explicit VR.
        (struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<H", 4) + bytes(8), "dicom"),
        # Preamble-less, implicit VR: (0008,0016) with a 26-byte UID.
        (struct.pack("<HHI", 0x0008, 0x0016, 26) + b"1.2.840.10008.5.1.4.1.1.1\x00", "dicom"),
    ],
)
def test_sniff_format_recognises_signatures(head: bytes, expected: str) -> None:
    assert sniff_format(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello, this is a text file pretending to be a PNG\n" * 4,
        b"BM but not a bitmap, just text starting with BM" * 2,  # "BM" alone is not enough
        b"GIF89a" + bytes(16),  # GIF is not a supported format
        struct.pack("<HHI", 0x0010, 0x0010, 99999) + bytes(8),  # group 0010 is not a plausible start
        struct.pack("<HHI", 0x0008, 0x0016, 10_000_000) + bytes(8),  # implausible first length
        bytes(200),
    ],
)
def test_sniff_format_rejects_non_images(head: bytes) -> None:
    assert sniff_format(head) is None


@pytest.mark.parametrize(
    ("pillow_format", "expected"), [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff"), ("BMP", "bmp")]
)
def test_sniff_file_ignores_the_extension(tmp_path, pillow_format: str, expected: str) -> None:
    path = tmp_path / "scan.dat"  # an extension that names no format
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(path, format=pillow_format)
    assert sniff_file(path) == expected


def test_sniff_file_on_a_text_file(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    assert sniff_file(path) is None


def test_dicom_marker_wins_over_a_tiff_preamble(tmp_path) -> None:
    """A valid DICOM whose 128-byte preamble starts with TIFF bytes is a DICOM (PS3.10 7.1)."""
    from covidcxr.io import read_image
    from covidcxr.io.writers import dicom_dataset

    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096).astype(np.uint16)
    dataset = dicom_dataset(pixels, "MONOCHROME2", 12)
    dataset.preamble = (b"II*\x00" + struct.pack("<I", 8)).ljust(128, b"\x00")
    path = tmp_path / "dual_personality"  # no extension, as PACS exports write them
    dataset.save_as(path, enforce_file_format=True)
    assert path.read_bytes()[:4] == b"II*\x00"
    assert sniff_file(path) == "dicom"
    image = read_image(path)
    assert image.metadata.format == "dicom" and image.pixels.shape == (64, 48)
