"""Tell an image's format from its first bytes, never from its file name.

Collections in the wild hold JPEGs named ``.png``, DICOMs named ``.jpg`` and DICOMs with
no extension at all, so `covidcxr.io.read_image` dispatches on content. The checks here
are the published magic numbers of each format; they are cheap (one 512-byte read) and
decide which decoder gets the file, so Pillow is never asked to guess among its dozens
of plugins.
"""

from __future__ import annotations

import struct
from pathlib import Path

# Enough for every signature below, including DICOM's "DICM" at bytes 128-131.
SNIFF_BYTES = 512

SNIFFED_FORMATS: tuple[str, ...] = ("png", "jpeg", "tiff", "bmp", "dicom")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Classic TIFF ("*" = 42) and BigTIFF ("+" = 43), little- and big-endian.
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Sizes of the BMP info headers that exist (OS/2 core, V1 to V5); checking it stops any
# file that merely starts with the letters "BM" from being taken for a bitmap.
_BMP_INFO_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
# A DICOM stream without the preamble starts directly with its first element: the file
# meta group (0002) or, in old ACR-NEMA-style files, the identifying group (0008).
_DICOM_FIRST_GROUPS = frozenset({0x0002, 0x0008})
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def has_dicom_preamble(head: bytes) -> bool:
    """True when ``head`` holds the 128-byte preamble followed by ``b"DICM"`` (PS3.10 7.1)."""
    return head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def _looks_like_bare_dicom(head: bytes) -> bool:
    """True when ``head`` plausibly starts with a little-endian DICOM data element.

    The first element's group must be 0002 or 0008 and, after the tag, there must be
    either an explicit VR (two known letters) or an implicit-VR length that fits in the
    file's first kilobytes; arbitrary binary data rarely passes both.
    """
    if len(head) < 8:
        return False
    group, _element = struct.unpack_from("<HH", head, 0)
    if group not in _DICOM_FIRST_GROUPS:
        return False
    if head[4:6] in _DICOM_VRS:
        return True
    (implicit_length,) = struct.unpack_from("<I", head, 4)
    # The first elements (group lengths, UIDs, character sets) are short.
    return implicit_length <= 1024


def sniff_format(head: bytes) -> str | None:
    """Name the image format whose signature ``head`` starts with.

    Args:
        head: the first bytes of a file; `SNIFF_BYTES` (512) are enough for every format,
            fewer work for all but DICOM-with-preamble (which needs 132).

    Returns:
        ``"png"``, ``"jpeg"``, ``"tiff"``, ``"bmp"``, ``"dicom"`` or None when none matches.

    Example:
        >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8))
        'png'
        >>> sniff_format(bytes(128) + b"DICM"), sniff_format(b"hello") is None
        ('dicom', True)
        >>> sniff_format(b"II*\\x00" + bytes(124) + b"DICM")  # TIFF bytes in the preamble
        'dicom'
    """
    # DICOM first: PS3.10's 128-byte preamble is free for applications to fill, and some
    # write a TIFF header there (a "dual-personality" file), so a file with "DICM" at
    # byte 128 is a DICOM whatever its first bytes say.
    if has_dicom_preamble(head):
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if head[:4] in _TIFF_SIGNATURES:
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 18:
        (info_header_size,) = struct.unpack_from("<I", head, 14)
        if info_header_size in _BMP_INFO_HEADER_SIZES:
            return "bmp"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return None


def read_head(path: str | Path, size: int = SNIFF_BYTES) -> bytes:
    """Return the first ``size`` bytes of a file (fewer if the file is shorter).

    Raises:
        OSError: when the file cannot be opened; callers turn it into `ImageReadError`.
    """
    with open(path, "rb") as handle:
        return handle.read(size)


def sniff_file(path: str | Path) -> str | None:
    """Name the image format of the file at ``path`` from its content (see `sniff_format`).

    Raises:
        OSError: when the file cannot be opened (missing, a directory, no permission).

    Example:
        >>> sniff_file("scan_without_extension")  # doctest: +SKIP
        'dicom'
    """
    return sniff_format(read_head(path))
