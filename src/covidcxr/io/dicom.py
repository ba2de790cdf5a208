"""DICOM chest radiographs: header metadata, and pixels as display-ready grey in [0, 1].

The pixel pipeline is the one a DICOM viewer runs (PS3.4 N.2.1), via `pydicom.pixels`:

1. stored values -> *Modality LUT* (*Rescale Slope/Intercept* or a *Modality LUT
   Sequence*): `pydicom.pixels.apply_modality_lut`;
2. -> *VOI LUT Sequence* if present, else the first *Window Center/Width* (LINEAR,
   LINEAR_EXACT or SIGMOID): `pydicom.pixels.apply_voi`/`apply_windowing`; with
   neither, a min-max stretch over the image;
3. -> [0, 1] by the output range of that step;
4. -> ``1 - x`` for MONOCHROME1, where the smallest stored value is white.

Colour images (RGB, YBR_*) are reduced to ITU-R 601 luminance. Only the elements needed
for the image and for `ImageMetadata` are ever read: names, ids, dates, accession numbers
and institutions are never accessed, so they cannot reach metadata, logs or errors.

Example:
    >>> meta = read_dicom_metadata("rsna/stage_2_train_images/0004cfab.dcm")  # doctest: +SKIP
    >>> meta.view, meta.sex, meta.age, meta.photometric  # doctest: +SKIP
    ('PA', 'F', 51.0, 'MONOCHROME2')
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from covidcxr.errors import ImageReadError
from covidcxr.io.image import (
    DEFAULT_MAX_PIXELS,
    CXRImage,
    ImageMetadata,
    ensure_within_pixel_limit,
    read_file_head,
    require_file,
)
from covidcxr.io.sniff import has_dicom_preamble, sniff_format

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour encodings pydicom's decoders return as RGB (YBR_* are converted by default).
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# ITU-R BT.601 luma weights, the same as Pillow's convert("L") for raster files.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def read_dicom_metadata(path: str | Path) -> ImageMetadata:
    """Read a DICOM file's header (never its pixel data) into `ImageMetadata`.

    Meant for source adapters that index thousands of files: it stops parsing before
    *Pixel Data*. It raises for everything the header alone shows `read_dicom` would
    refuse (not DICOM, no *Rows/Columns*, multi-frame); a missing *Pixel Data* element is
    only found by `read_dicom`.

    Args:
        path: the DICOM file (with or without the 128-byte preamble).

    Returns:
        `ImageMetadata` with ``format="dicom"``. ``window`` is the first *Window
        Center/Width* when that is what `read_dicom` would apply, and ``voi`` says which
        VOI step it would use (``"min_max"`` when the header has no window nor VOI LUT).

    Raises:
        ImageReadError: naming the file and the reason.

    Example:
        >>> read_dicom_metadata("0004cfab.dcm").to_dict()  # doctest: +SKIP
        {'format': 'dicom', 'width': 1024, 'height': 1024, 'bits_stored': 8, 'view': 'PA', ...}
    """
    path = require_file(path)
    dataset = _read_dataset(path, stop_before_pixels=True)
    try:
        _check_single_frame_image(path, dataset)
        window, voi = _planned_voi(dataset)
        return _metadata(dataset, window=window, voi=voi)
    except ImageReadError:
        raise
    except Exception as exc:  # a malformed value in one of the elements we read
        raise ImageReadError(path, f"invalid DICOM header: {exc}") from exc


def read_dicom(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> CXRImage:
    """Read a single-frame DICOM radiograph as display-ready float32 grey in [0, 1].

    See the module docstring for the pixel pipeline. `covidcxr.io.read_image` calls this
    for any file whose content is DICOM.

    Args:
        path: the DICOM file (with or without the 128-byte preamble).
        max_pixels: refuse images whose *Rows* x *Columns* exceed this, before decoding.

    Returns:
        A `CXRImage`: ``pixels`` float32 ``(Rows, Columns)`` in [0, 1] (1 = white), and
        `ImageMetadata` whose ``window``/``voi`` say which VOI step was applied.

    Raises:
        ImageReadError: not DICOM, no pixel data, multi-frame, too large, compressed with
            a transfer syntax no installed decoder supports, corrupt pixel data.

    Example:
        >>> image = read_dicom("0004cfab.dcm")  # doctest: +SKIP
        >>> image.pixels.shape, float(image.pixels.max()) <= 1.0  # doctest: +SKIP
        ((1024, 1024), True)
    """
    path = require_file(path)
    dataset = _read_dataset(path, stop_before_pixels=False)
    try:
        rows, columns = _check_single_frame_image(path, dataset)
        ensure_within_pixel_limit(path, columns, rows, max_pixels)
        if "PixelData" not in dataset:
            floats = "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset
            reason = "DICOM has float pixel data, not supported" if floats else "DICOM has no pixel data"
            raise ImageReadError(path, reason)
        photometric = _text(dataset.get("PhotometricInterpretation")) or ""
        if photometric not in _MONOCHROME and photometric not in _RGB_LIKE:
            raise ImageReadError(path, f"photometric interpretation {photometric or '(missing)'!r} is not supported")
        stored = _decode_stored_values(path, dataset)
        if photometric in _MONOCHROME:
            pixels, window, voi = _monochrome_to_unit(path, dataset, stored)
            if photometric == "MONOCHROME1":
                # MONOCHROME1 stores the lowest value as white; flip so 1 is always white.
                pixels = 1.0 - pixels
        else:
            pixels, window, voi = _colour_to_unit(dataset, stored), None, None
        metadata = _metadata(dataset, window=window, voi=voi)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises ValueError, AttributeError, KeyError... on bad data
        raise ImageReadError(path, f"invalid DICOM image: {exc}") from exc
    return CXRImage(pixels=np.clip(pixels, 0.0, 1.0).astype(np.float32), metadata=metadata)


def _read_dataset(path: Path, stop_before_pixels: bool) -> Dataset:
    """Parse a DICOM file, with or without preamble, into a pydicom `Dataset`.

    pydicom refuses files without the 128-byte preamble and ``DICM`` marker unless
    forced; sniffing has already vouched that such a file starts with a DICOM element,
    so those (old ACR-NEMA-style exports) are read with ``force=True``.
    """
    head = read_file_head(path)
    if sniff_format(head) != "dicom":
        raise ImageReadError(path, "not a DICOM file: no 'DICM' marker at byte 128 and no DICOM element at the start")
    try:
        # Opened here, not by pydicom, so the file is closed even when parsing fails.
        with open(path, "rb") as handle:
            dataset = pydicom.dcmread(handle, force=not has_dicom_preamble(head), stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError...
        raise ImageReadError(path, f"unreadable DICOM header: {exc}") from exc
    _ensure_transfer_syntax(dataset)
    return dataset


def _ensure_transfer_syntax(dataset: Dataset) -> None:
    """Give a file without file meta the transfer syntax pydicom detected while parsing.

    Decoding pixels needs *Transfer Syntax UID*; files without a file meta group only
    have the encoding pydicom inferred (implicit/explicit VR, byte order).
    """
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None:
        file_meta = dataset.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in file_meta:
        return
    implicit_vr, little_endian = dataset.original_encoding
    if implicit_vr:
        file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian


def _check_single_frame_image(path: Path, dataset: Dataset) -> tuple[int, int]:
    """Return ``(Rows, Columns)``; refuse datasets without them or with several frames."""
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not rows or not columns:
        raise ImageReadError(path, "DICOM has no Rows/Columns: not an image, or a truncated header")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); expected a single radiograph")
    return int(rows), int(columns)


def _decode_stored_values(path: Path, dataset: Dataset) -> np.ndarray:
    """Decode *Pixel Data* into stored values (RGB for colour), naming missing decoders."""
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    described = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageReadError(path, f"no DICOM pixel decoder exists for transfer syntax {described}") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ImageReadError(
            path, f"pixel data is compressed as {described} and no installed decoder supports it (install: {needs})"
        )
    try:
        return dataset.pixel_array
    except Exception as exc:
        raise ImageReadError(path, f"truncated or corrupt DICOM pixel data ({described}): {exc}") from exc


def _planned_voi(dataset: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """Which VOI step the pipeline will use, from the header: ``(window, voi)``."""
    if _text(dataset.get("PhotometricInterpretation")) not in _MONOCHROME:
        return None, None
    if _has_voi_lut(dataset):
        return None, "lut"
    window = _first_window(dataset)
    if window is not None and _window_is_valid(dataset, window):
        return window, "window"
    return None, "min_max"


def _monochrome_to_unit(
    path: Path, dataset: Dataset, stored: np.ndarray
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Modality LUT, then VOI LUT / window / min-max, scaled to [0, 1] (before inversion).

    Returns:
        ``(pixels, window, voi)``: float64 ``(H, W)`` in [0, 1], the applied window or
        None, and ``"lut"``, ``"window"`` or ``"min_max"``.
    """
    values = apply_modality_lut(stored, dataset)
    window, voi = _planned_voi(dataset)
    if voi == "lut":
        if not np.issubdtype(values.dtype, np.integer):
            # A VOI LUT is indexed by integers; a rescale makes floats that are whole numbers.
            values = np.rint(values).astype(np.int64)
        lut_bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        # The LUT's output range is fixed by its declared bits per entry (PS3.3 C.11.2.1.1).
        return apply_voi(values, dataset, index=0) / float(2**lut_bits - 1), None, voi
    if voi == "window":
        displayed = apply_windowing(values, dataset, index=0)
        low, high = _window_output_range(dataset)
        return (displayed - low) / (high - low), window, voi
    if _first_window(dataset) is not None:
        warnings.warn(
            f"{path}: DICOM window width is not valid for its VOI LUT function; "
            "using the image's min-max range instead",
            stacklevel=3,
        )
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant image carries no contrast to stretch
        return np.zeros(values.shape), None, voi
    return (values - low) / (high - low), None, voi


def _window_output_range(dataset: Dataset) -> tuple[float, float]:
    """The ``(y_min, y_max)`` pydicom's windowing maps the window onto.

    pydicom picks that range from *Bits Stored*, *Pixel Representation* and the rescale;
    rather than re-derive its rule, ask it: any window sends -inf to y_min and +inf to
    y_max (LINEAR clips, SIGMOID saturates).
    """
    low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset, index=0)
    return float(low), float(high)


def _colour_to_unit(dataset: Dataset, rgb: np.ndarray) -> np.ndarray:
    """RGB stored values ``(H, W, 3)`` -> ITU-R 601 luminance in [0, 1], float64 ``(H, W)``."""
    bits = int(dataset.get("BitsStored") or dataset.BitsAllocated)
    return (rgb.astype(np.float64) @ _LUMA_WEIGHTS) / float(2**bits - 1)


def _has_voi_lut(dataset: Dataset) -> bool:
    """True when the first *VOI LUT Sequence* item has both a descriptor and data."""
    sequence = dataset.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _first_window(dataset: Dataset) -> tuple[float, float] | None:
    """The first *Window Center/Width* pair (a file may offer several), or None."""
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    first = [value[0] if isinstance(value, MultiValue) else value for value in (center, width)]
    return float(first[0]), float(first[1])


def _window_is_valid(dataset: Dataset, window: tuple[float, float]) -> bool:
    """Whether pydicom accepts the window width for the file's *VOI LUT Function*."""
    function = (_text(dataset.get("VOILUTFunction")) or "LINEAR").upper()
    width = window[1]
    if function == "LINEAR":
        return width >= 1
    return function in ("LINEAR_EXACT", "SIGMOID") and width > 0


def _metadata(dataset: Dataset, window: tuple[float, float] | None, voi: str | None) -> ImageMetadata:
    """Build `ImageMetadata` from the few non-identifying elements it carries."""
    # Imported here: covidcxr.data.manifest imports covidcxr.io (for atomic writes), so a
    # module-level import would be circular whenever the manifest is imported first.
    from covidcxr.data.manifest import normalize_age, normalize_sex, normalize_view

    return ImageMetadata(
        format="dicom",
        width=int(dataset.Columns),
        height=int(dataset.Rows),
        bits_stored=int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 0),
        view=normalize_view(dataset.get("ViewPosition")),
        sex=normalize_sex(dataset.get("PatientSex")),
        age=normalize_age(dataset.get("PatientAge")),
        photometric=_text(dataset.get("PhotometricInterpretation")),
        modality=_text(dataset.get("Modality")),
        window=window,
        voi=voi,
    )


def _text(value: object) -> str | None:
    """A DICOM code string stripped and upper-cased, or None when absent or blank."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None
