"""Read any chest X-ray file into one float32 ``(H, W)`` array in [0, 1], plus metadata.

`read_image` looks at the file's first bytes (`covidcxr.io.sniff`), not its name, and
hands PNG/JPEG/TIFF/BMP to Pillow and DICOM to `covidcxr.io.dicom`. Whatever the input
(8- or 16-bit, greyscale, RGB, palette, MONOCHROME1 DICOM with a window), the output is
one grey channel where 0 is black and 1 is white as a radiologist would see it.

Every unreadable input raises `covidcxr.errors.ImageReadError` naming the file and the
reason; no Pillow or pydicom exception escapes. Metadata never carries identifiers
(names, ids, dates, institutions): only what a classifier or an audit may use.

Example:
    >>> image = read_image("cohen/images/1-s2.0-S0140673620303706-fx1_lrg.jpg")  # doctest: +SKIP
    >>> image.pixels.shape, image.pixels.dtype, image.metadata.format  # doctest: +SKIP
    ((1024, 1024), dtype('float32'), 'jpeg')
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.errors import ImageReadError, ImageTooLargeError
from covidcxr.io.sniff import read_head, sniff_format

# The largest real chest radiographs are about 20 MP (e.g. 4280x4280 detectors); 100 MP
# leaves room for any of them while refusing a crafted header that asks for gigabytes.
DEFAULT_MAX_PIXELS = 100_000_000

RASTER_FORMATS: tuple[str, ...] = ("png", "jpeg", "tiff", "bmp")
#: sniffed format -> the only Pillow plugin allowed to open it
PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP"}
_SUPPORTED_WORDS = "PNG, JPEG, TIFF, BMP or DICOM"


@dataclass(frozen=True)
class ImageMetadata:
    """What a file says about its image, free of any identifier.

    Attributes:
        format: ``"png"``, ``"jpeg"``, ``"tiff"``, ``"bmp"`` or ``"dicom"`` (from content).
        width: columns of the image, in pixels.
        height: rows of the image, in pixels.
        bits_stored: bits per sample that carried data: 1, 8 or 16 for raster files (Pillow
            reduces 16-bit colour PNG/TIFF to 8 bits), DICOM's *Bits Stored* otherwise.
        view: ``PA``, ``AP``, ``AP Supine``, ``lateral`` or ``unknown`` (DICOM
            *View Position*, normalised by `covidcxr.data.manifest.normalize_view`).
        sex: ``"M"``, ``"F"`` or None (DICOM *Patient's Sex*).
        age: age in years, NaN when unknown (DICOM *Patient's Age*, e.g. ``"058Y"``).
        photometric: DICOM *Photometric Interpretation* (``MONOCHROME1``...), None for raster.
        modality: DICOM *Modality* (``CR``, ``DX``...), None for raster.
        window: the ``(center, width)`` of the DICOM window that was applied, None when no
            window was (raster files, VOI LUT, min-max stretch, colour).
        voi: how DICOM stored values became display values: ``"window"`` (*Window
            Center/Width*), ``"lut"`` (*VOI LUT Sequence*), ``"min_max"`` (neither present:
            stretched over the image's own range); None for raster and colour images.
    """

    format: str
    width: int
    height: int
    bits_stored: int
    view: str = "unknown"
    sex: str | None = None
    age: float = math.nan
    photometric: str | None = None
    modality: str | None = None
    window: tuple[float, float] | None = None
    voi: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Return the fields as a plain dict (e.g. for a JSON sidecar or a manifest row).

        Example:
            >>> ImageMetadata("png", 4, 3, 8).to_dict()["view"]
            'unknown'
        """
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class CXRImage:
    """A chest X-ray as one grey channel, and what its file said about it.

    Attributes:
        pixels: float32 array of shape ``(H, W)``, values in [0, 1], 1 = white (bone).
        metadata: the file's `ImageMetadata`; ``metadata.height, metadata.width`` equals
            ``pixels.shape``.

    Equality is not defined (comparing arrays element-wise is ambiguous); compare
    ``pixels`` with NumPy and ``metadata`` with ``==``.
    """

    pixels: np.ndarray
    metadata: ImageMetadata

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.float32:
            raise ValueError(f"CXRImage pixels must be float32 (H, W), got {self.pixels.dtype} {self.pixels.shape}")

    def __repr__(self) -> str:
        height, width = self.pixels.shape
        return f"CXRImage(pixels=<float32 {height}x{width}>, metadata={self.metadata!r})"


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a `Path` if it is an existing, non-empty regular file.

    Raises:
        ImageReadError: "file does not exist", "not a regular file" or "empty file".
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file (a directory?)")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file")
    return path


def read_file_head(path: Path) -> bytes:
    """`read_head` with an unreadable file (permissions, I/O error) as `ImageReadError`."""
    try:
        return read_head(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file: {exc.strerror or exc}") from exc


def ensure_within_pixel_limit(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose header asks for more than ``max_pixels`` pixels.

    Called with the header's size, before any pixel is decoded, so a few-kilobyte file
    that claims to be 20000x20000 costs nothing.

    Raises:
        ImageTooLargeError: naming the size and the limit.
    """
    pixels = int(width) * int(height)
    if pixels > max_pixels:
        raise ImageTooLargeError(
            path,
            f"image is {width}x{height} = {pixels / 1e6:g} MP, over the {max_pixels / 1e6:g} MP limit "
            "(decompression-bomb guard)",
        )


def _sniff_or_raise(path: str | Path) -> tuple[Path, str]:
    """Return the file's path and its sniffed format, or raise `ImageReadError`."""
    path = require_file(path)
    image_format = sniff_format(read_file_head(path))
    if image_format is None:
        raise ImageReadError(path, f"not an image: content is not {_SUPPORTED_WORDS}")
    return path, image_format


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> CXRImage:
    """Read a PNG, JPEG, TIFF, BMP or DICOM chest X-ray as float32 grey in [0, 1].

    The format is decided by the file's content, not its extension. Raster files are
    decoded by Pillow: 8-bit values are divided by 255, 16-bit by 65535 (the container's
    range, whatever the sensor used), colour is reduced to luminance (ITU-R 601) and alpha
    is dropped, not composited. DICOM goes through `covidcxr.io.dicom.read_dicom`
    (modality LUT, VOI LUT or window, MONOCHROME1 inversion). JPEG EXIF orientation is
    not applied: pixels stay in stored order, as in DICOM and in masks drawn on them.

    Args:
        path: the image file.
        max_pixels: refuse images whose header declares more pixels than this
            (decompression-bomb guard). Pillow's own limit (``Image.MAX_IMAGE_PIXELS``,
            about 179 MP for an error) still applies on top of it.

    Returns:
        A `CXRImage`: ``pixels`` float32 ``(H, W)`` in [0, 1], and `ImageMetadata`.

    Raises:
        ImageReadError: for every unreadable input (missing, empty, not an image,
            truncated, multi-frame, too large, undecodable), naming the file and reason.

    Example:
        >>> image = read_image("site/0001.dcm")  # doctest: +SKIP
        >>> image.pixels.shape, image.metadata.view  # doctest: +SKIP
        ((2048, 2048), 'PA')
    """
    path, image_format = _sniff_or_raise(path)
    if image_format == "dicom":
        # Imported here because covidcxr.io.dicom builds on this module's types.
        from covidcxr.io.dicom import read_dicom

        return read_dicom(path, max_pixels=max_pixels)
    return _read_raster(path, image_format, max_pixels)


def read_mask(path: str | Path, shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a lung mask (0/255 or 0/1, any raster format) as a boolean ``(H, W)`` array.

    Values are thresholded at 0.5 of the format's range, except masks stored as 0/1
    levels (their brightest value is 1), whose 1s are the foreground.

    Args:
        path: the mask file (PNG, JPEG, TIFF or BMP; colour masks are taken as luminance).
        shape: the ``(H, W)`` of the image the mask belongs to; when given, a mask of
            another size is refused (masks are never resized silently).

    Returns:
        bool array of shape ``(H, W)``, True inside the lungs.

    Raises:
        ImageReadError: unreadable file, a DICOM file, or a size that differs from ``shape``.

    Example:
        >>> mask = read_mask("masks/0001.png", shape=image.pixels.shape)  # doctest: +SKIP
        >>> mask.dtype, mask.mean()  # doctest: +SKIP
        (dtype('bool'), 0.27)
    """
    path, image_format = _sniff_or_raise(path)
    if image_format == "dicom":
        raise ImageReadError(path, "a mask must be a PNG, JPEG, TIFF or BMP image, not DICOM")
    image = _read_raster(path, image_format, DEFAULT_MAX_PIXELS)
    levels_top = 2 ** image.metadata.bits_stored - 1
    stored_max = round(float(image.pixels.max(initial=0.0)) * levels_top)
    mask = image.pixels > 0 if stored_max <= 1 else image.pixels > 0.5
    if shape is not None and tuple(shape) != mask.shape:
        raise ImageReadError(
            path,
            f"mask shape (H, W) = {mask.shape} differs from its image's {tuple(shape)}; "
            "masks must be the size of their image",
        )
    return mask


class _UnsupportedMode(Exception):
    """A Pillow pixel mode covidcxr does not turn into grey (e.g. float ``"F"``)."""


def open_raster(path: Path, image_format: str) -> Image.Image:
    """Open (not decode) a sniffed PNG/JPEG/TIFF/BMP with Pillow, only that format's plugin.

    Raises:
        ImageTooLargeError: Pillow's own bomb limit fired while parsing the header.
        ImageReadError: a corrupt header.
    """
    name = PILLOW_FORMATS[image_format]
    try:
        # Pillow warns between its limit and twice its limit; our own explicit check
        # (`ensure_within_pixel_limit`) is the one that decides, so its warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the sniffed format's plugin may open it: no guessing among all plugins.
            return Image.open(path, formats=[name])
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (about 179 MP) fired while parsing the header, before our check.
        raise ImageTooLargeError(path, f"image is too large, rejected before decoding (decompression-bomb guard): {exc}") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad headers
        raise ImageReadError(path, f"corrupt {name} header: {exc}") from exc


def _read_raster(path: Path, image_format: str, max_pixels: int) -> CXRImage:
    """Decode a PNG/JPEG/TIFF/BMP file with Pillow into a `CXRImage` (see `read_image`)."""
    name = PILLOW_FORMATS[image_format]
    image = open_raster(path, image_format)
    with image:
        width, height = image.size
        ensure_within_pixel_limit(path, width, height, max_pixels)
        try:
            frames = getattr(image, "n_frames", 1)
        except Exception as exc:  # counting TIFF pages walks every directory
            raise ImageReadError(path, f"corrupt {name}: {exc}") from exc
        if frames > 1:
            raise ImageReadError(path, f"multi-frame image ({frames} frames); expected a single frame")
        try:
            image.load()
            pixels, bits_stored = _to_unit_grey(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(path, f"image is too large (decompression-bomb guard): {exc}") from exc
        except _UnsupportedMode as exc:
            raise ImageReadError(path, str(exc)) from exc
        except Exception as exc:  # truncated data: OSError; broken zlib/JPEG streams: others
            raise ImageReadError(path, f"truncated or corrupt {name}: {exc}") from exc

    metadata = ImageMetadata(format=image_format, width=width, height=height, bits_stored=bits_stored)
    return CXRImage(pixels=pixels, metadata=metadata)


def _to_unit_grey(image: Image.Image) -> tuple[np.ndarray, int]:
    """Return a loaded Pillow image as float32 ``(H, W)`` grey in [0, 1], and its bits.

    16-bit modes are divided by 65535, 8-bit by 255; colour goes through Pillow's ITU-R
    601 luminance (``L = 0.299 R + 0.587 G + 0.114 B``) and alpha is dropped.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32), 1
    if mode == "L":
        return _divide(np.asarray(image), 255), 8
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # unsigned 16-bit; NumPy keeps the byte order
        return _divide(np.asarray(image), 65535), 16
    if mode == "I":
        # 32-bit integer container: Pillow uses it for some 16-bit TIFFs; anything beyond
        # the 16-bit range has no agreed white point, so it is refused rather than guessed.
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise _UnsupportedMode("32-bit integer pixels outside 0-65535 are not supported; save as 8 or 16 bits")
        return _divide(values, 65535), 16
    if mode == "F":
        raise _UnsupportedMode("32-bit float pixels (mode 'F') are not supported; save as 8 or 16 bits")
    if mode in ("P", "PA"):
        # Expand the palette first; converting a palette with transparency straight to
        # "L" makes Pillow warn.
        image = image.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "RGBX", "LA"):
        try:  # CMYK, YCbCr, LAB, HSV: through RGB
            image = image.convert("RGB")
        except ValueError as exc:
            raise _UnsupportedMode(f"unsupported pixel mode {mode!r}") from exc
    # For RGBA/LA, Pillow's "L" conversion ignores alpha: transparency is dropped.
    return _divide(np.asarray(image.convert("L")), 255), 8


def _divide(values: np.ndarray, top: int) -> np.ndarray:
    """``values / top`` as float32 (one correctly rounded float32 division per pixel)."""
    return values.astype(np.float32) / np.float32(top)
