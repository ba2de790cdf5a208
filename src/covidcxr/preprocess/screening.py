"""Is this file a chest radiograph we may train on or run? Checks before and after decoding.

One check for every path: `covidcxr.preprocess.cache` (training, ``covidcxr preprocess``)
refuses with it what `covidcxr.serve.predictor` (``covidcxr predict``, the service) refuses,
through `covidcxr.preprocess.pipeline.preprocess_batch` (``screen=True``): `inspect_input`
on the file, `screen_pixels` on the decoded image.

Two kinds of outcome:

* **refusals** (a `covidcxr.serve.errors.ServeError`, a 4xx in the service): content that
  is not a supported image (415), a header asking for more pixels than the limit (413,
  checked before any pixel is decoded), an undecodable file (422), and images that are
  plainly not chest radiographs (422): a colour photograph, an extreme aspect ratio, a
  tiny or blank image, a DICOM whose modality is not projection radiography;
* **warnings** (`InputWarning`): the image is read and the model runs, but the result
  should not be trusted as it stands: unusual aspect ratio or low resolution, lateral
  view, an implausible or rejected lung segmentation (and, in `covidcxr.serve.predictor`,
  an image far from the training distribution or a saliency map mostly outside the lungs).

The thresholds are constants below, each with the figures it comes from. They were set
on the shared collection (2,521 images from six sources: every aspect ratio W/H lies in
0.75–2.23, 99.8 % in 0.79–1.83; lung-mask area fraction of the shipped U-Net 0.15–0.57
and left/right balance 0.28–0.90 on 88 images, 15 per source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidcxr.errors import ImageReadError, ImageTooLargeError
from covidcxr.io.dicom import read_dicom_metadata
from covidcxr.io.image import PILLOW_FORMATS, open_raster, require_file
from covidcxr.io.sniff import read_head, sniff_format
from covidcxr.serve.errors import ImageTooLarge, NotAChestXray, UnreadableImage, UnsupportedImageType

__all__ = [
    "DEFAULT_SERVICE_MAX_PIXELS",
    "InputInfo",
    "InputWarning",
    "colour_fraction",
    "inspect_input",
    "opacity_cut_warnings",
    "screen_pixels",
    "segmentation_warnings",
]

# The largest real radiographs are ~20 MP (4280 x 4280 detectors); 40 MP leaves room for any
# of them while bounding what one request may decode (a 40 MP float32 image is 160 MB).
DEFAULT_SERVICE_MAX_PIXELS = 40_000_000

# Aspect ratio W/H: refused outside [1/3, 3] (a banner, a strip, a multi-panel figure);
# warned outside [0.7, 1.9] (the shared collection spans 0.75-2.23, 99.8 % within 0.79-1.83).
ASPECT_REFUSE = (1 / 3, 3.0)
ASPECT_WARN = (0.7, 1.9)
# Short side in pixels: refused below 32 (nothing to segment), warned below 128 (the shared
# collection's smallest originals are 156 px).
MIN_SIDE_REFUSE = 32
MIN_SIDE_WARN = 128
# A colour pixel: chroma (Hasler & Suesstrunk 2003 opponent axes, 0-255 scale) further than
# 30 from the image's median chroma. Measuring against the median lets a uniformly tinted
# scan (sepia, a blue-ish monitor photo) count as grey; only pixels of *other* colours count.
COLOUR_DISTANCE = 30.0
# Share of colour pixels: refused above 25 % (a photograph, a coloured diagram); warned
# above 3 % (coloured arrows, annotations or overlays burned into the image).
COLOUR_REFUSE = 0.25
COLOUR_WARN = 0.03
# A blank image: the equalised image's standard deviation below this.
BLANK_STD = 1e-3
# A synthetic graphic (a test pattern, a diagram, a binary mask): at most this many distinct
# 8-bit grey levels in the whole equalised image. A radiograph's continuous attenuation
# and detector noise give many more: 102 or more on 150 random images of the shared
# collection, 129 or more on `covidcxr.data.synth` phantoms.
MAX_LEVELS_GRAPHIC = 16
# DICOM modalities of projection radiographs (CR computed, DX digital, RG radiographic
# imaging, OT other/secondary capture, which exports and scanned films often use).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "OT", "DR", "PX"})
# Lung segmentation plausibility (full-image U-Net mask, `PreprocessedImage` fields): the
# 88-image sample above gave area 0.15-0.57 and balance 0.28-0.90 (0.41-0.70 for 96 % of it;
# the 0.90 was a Shenzhen image with one lung half-missed).
LUNG_AREA_PLAUSIBLE = (0.08, 0.65)
LUNG_BALANCE_PLAUSIBLE = (0.25, 0.75)
# A lung mask likely to have cut away opacity: its shorter lung reaches less than this share of
# the taller one's height (`covidcxr.preprocess.lung_coverage.lung_shape`). Reference masks of
# the shared collection: 5th percentile 0.82 (446 masks); see the model card for how often it fires.
OPACITY_CUT_HEIGHT_RATIO = 0.8

_SUPPORTED = "PNG, JPEG, TIFF, BMP or DICOM"
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
_COLOUR_THUMBNAIL = 256


@dataclass(frozen=True)
class InputWarning:
    """One reason not to trust a result as it stands.

    Attributes:
        code: machine-readable name (``"lateral_view"``, ``"out_of_distribution"``...).
        message: what was seen and why it matters, in words.
    """

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class InputInfo:
    """What the file says about itself, free of identifiers (no names, ids, dates, sex, age).

    Attributes:
        format: sniffed format (``png``, ``jpeg``, ``tiff``, ``bmp``, ``dicom``).
        width: columns.
        height: rows.
        view: DICOM view position (``PA``, ``AP``, ``lateral``...) or ``unknown``.
        modality: DICOM modality or None.
        colour_fraction: share of pixels coloured unlike the image's dominant tint (0 for
            grey images and DICOM).
        warnings: warnings found before preprocessing.
    """

    format: str
    width: int
    height: int
    view: str = "unknown"
    modality: str | None = None
    colour_fraction: float = 0.0
    warnings: list[InputWarning] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "view": self.view,
            "modality": self.modality,
            "colour_fraction": round(self.colour_fraction, 4),
        }


def colour_fraction(rgb: np.ndarray) -> float:
    """Share of pixels whose chroma is far (> `COLOUR_DISTANCE`) from the image's median chroma.

    Chroma uses the opponent axes of Hasler & Suesstrunk (2003), ``rg = R - G`` and
    ``yb = (R + G) / 2 - B`` on a 0-255 scale; grey has chroma (0, 0). Hand-written: it is
    four lines of NumPy and no library offers this robust variant (their colourfulness
    score counts a uniform tint as colour).

    Args:
        rgb: ``(H, W, 3)`` uint8 (or float on a 0-255 scale).

    Returns:
        A fraction in [0, 1].

    Example:
        >>> grey = np.full((8, 8, 3), 128, np.uint8)
        >>> colour_fraction(grey)
        0.0
        >>> marked = grey.copy(); marked[:2, :, 0] = 255   # a red band over a quarter of it
        >>> colour_fraction(marked)
        0.25
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    distance = np.hypot(rg - np.median(rg), yb - np.median(yb))
    return float((distance > COLOUR_DISTANCE).mean()) if distance.size else 0.0


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if int(width) * int(height) > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height / 1e6:g} MP, over this service's "
            f"{max_pixels / 1e6:g} MP limit (decompression-bomb guard); refused before decoding"
        )


def _inspect_raster(path: Path, image_format: str, max_pixels: int) -> InputInfo:
    name = PILLOW_FORMATS[image_format]
    try:
        image = open_raster(path, image_format)  # the reader's own header parsing and bomb guard
    except ImageTooLargeError as exc:
        raise ImageTooLarge(exc.reason) from None
    except ImageReadError as exc:
        raise UnreadableImage(exc.reason) from None
    with image:
        width, height = image.size
        _check_size(width, height, max_pixels)
        fraction = 0.0
        if image.mode in _COLOUR_MODES:
            try:
                # Only colour-mode files are decoded here (at reduced scale for JPEG); grey
                # ones go straight to the reader.
                image.draft("RGB", (_COLOUR_THUMBNAIL, _COLOUR_THUMBNAIL))
                image.thumbnail((_COLOUR_THUMBNAIL, _COLOUR_THUMBNAIL))
                fraction = colour_fraction(np.asarray(image.convert("RGB")))
            except Exception as exc:  # truncated data, broken streams
                raise UnreadableImage(f"truncated or corrupt {name}: {exc}") from None
    return InputInfo(format=image_format, width=int(width), height=int(height), colour_fraction=fraction)


def _dicom_has_pixel_data(path: Path) -> bool:
    """Whether a DICOM file has a *Pixel Data* element, without loading its value.

    Only the pixel-data tags are parsed (``specific_tags``), their values deferred, so
    no identifier is read and a large image costs nothing here.
    """
    import pydicom

    from covidcxr.io.sniff import has_dicom_preamble

    tags = ["PixelData", "FloatPixelData", "DoubleFloatPixelData"]
    try:
        with open(path, "rb") as handle:
            dataset = pydicom.dcmread(handle, force=not has_dicom_preamble(read_head(path)), specific_tags=tags, defer_size=1024)
            return any(tag in dataset for tag in tags)
    except Exception:  # the full reader names the problem later
        return True


def _inspect_dicom(path: Path, max_pixels: int) -> InputInfo:
    try:
        # Header only; covidcxr.io.dicom never reads names, ids or dates.
        metadata = read_dicom_metadata(path)
    except ImageReadError as exc:
        raise UnreadableImage(exc.reason) from None
    if not _dicom_has_pixel_data(path):
        raise UnreadableImage("DICOM has no pixel data")
    _check_size(metadata.width, metadata.height, max_pixels)
    modality = (metadata.modality or "").upper() or None
    if modality is not None and modality not in RADIOGRAPH_MODALITIES:
        raise NotAChestXray(
            f"DICOM modality {modality!r} is not a projection radiograph; expected one of {sorted(RADIOGRAPH_MODALITIES)}"
        )
    return InputInfo(format="dicom", width=metadata.width, height=metadata.height, view=metadata.view, modality=modality)


def inspect_input(path: str | Path, max_pixels: int = DEFAULT_SERVICE_MAX_PIXELS) -> InputInfo:
    """Sniff, size-check and screen a file before it is decoded for the model.

    Args:
        path: the file (for an upload: the service's private temporary copy).
        max_pixels: refuse headers declaring more pixels than this, before decoding.

    Returns:
        `InputInfo`, with the warnings found so far (aspect, resolution, colour marks,
        lateral view).

    Raises:
        UnsupportedImageType: content is none of PNG, JPEG, TIFF, BMP or DICOM (415).
        ImageTooLarge: header over ``max_pixels`` (413).
        UnreadableImage: corrupt header or data, DICOM without rows/columns (422).
        NotAChestXray: colour photograph, extreme aspect ratio, tiny image, non-radiograph
            DICOM modality (422).

    Example:
        >>> info = inspect_input("cxr.png")  # doctest: +SKIP
        >>> info.format, info.width, info.height, info.warnings  # doctest: +SKIP
        ('png', 320, 290, [])
    """
    try:
        path = require_file(path)
        head = read_head(path)
    except ImageReadError as exc:
        raise UnreadableImage(exc.reason) from None
    except OSError as exc:
        raise UnreadableImage(f"cannot open the file: {exc.strerror or exc}") from None
    image_format = sniff_format(head)
    if image_format is None:
        raise UnsupportedImageType(f"the content is not {_SUPPORTED} (decided from the bytes, not the file name)")
    info = _inspect_raster(path, image_format, max_pixels) if image_format != "dicom" else _inspect_dicom(path, max_pixels)

    aspect = info.width / info.height
    if not ASPECT_REFUSE[0] <= aspect <= ASPECT_REFUSE[1]:
        raise NotAChestXray(
            f"aspect ratio W/H = {aspect:.2f} ({info.width}x{info.height}) is far outside a chest radiograph's "
            f"(refused outside {ASPECT_REFUSE[0]:.2f}-{ASPECT_REFUSE[1]:.0f})"
        )
    if min(info.width, info.height) < MIN_SIDE_REFUSE:
        raise NotAChestXray(f"image is {info.width}x{info.height}: a side under {MIN_SIDE_REFUSE} px is too small to read")
    if info.colour_fraction > COLOUR_REFUSE:
        raise NotAChestXray(
            f"colour image: {info.colour_fraction:.0%} of its pixels are coloured (over {COLOUR_REFUSE:.0%}); "
            "a chest radiograph is greyscale (is this a photograph?)"
        )
    if info.colour_fraction > COLOUR_WARN:
        info.warnings.append(
            InputWarning("colour_marks", f"{info.colour_fraction:.0%} of the pixels are coloured (annotations or overlays?); "
                         "burned-in marks are a known shortcut")
        )
    if not ASPECT_WARN[0] <= aspect <= ASPECT_WARN[1]:
        info.warnings.append(
            InputWarning("unusual_aspect", f"aspect ratio W/H = {aspect:.2f} is unusual for a chest radiograph "
                         f"(training collections span about {ASPECT_WARN[0]}-{ASPECT_WARN[1]}); is it cropped or a figure?")
        )
    if min(info.width, info.height) < MIN_SIDE_WARN:
        info.warnings.append(
            InputWarning("low_resolution", f"image is only {info.width}x{info.height} px; detail the model needs may be lost")
        )
    if info.view == "lateral":
        info.warnings.append(
            InputWarning("lateral_view", "DICOM View Position says lateral; the model was trained on frontal (PA/AP) views only")
        )
    return info


def screen_pixels(pixels: np.ndarray) -> None:
    """Refuse a decoded image that is blank or a synthetic graphic (e.g. a test pattern).

    Args:
        pixels: the ``(H, W)`` image in [0, 1], equalised (equalisation maps levels
            one-to-one or merges them): the full image, or a strided sample of it for an
            image the pipeline downscales (`covidcxr.preprocess.pipeline.load_equalized`;
            never an area-averaged one, which would blend a graphic's levels into many).

    Raises:
        NotAChestXray: one uniform intensity (std below `BLANK_STD`), or at most
            `MAX_LEVELS_GRAPHIC` distinct grey levels.

    Example:
        >>> screen_pixels(np.linspace(0, 1, 64 * 64).reshape(64, 64))  # a smooth ramp passes
        >>> bars = np.repeat(np.arange(8) / 7, 8)[None].repeat(64, axis=0)
        >>> screen_pixels(bars)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        covidcxr.serve.errors.NotAChestXray: only 8 distinct grey levels...
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if float(pixels.std()) < BLANK_STD:
        raise NotAChestXray("the image is blank (one uniform intensity)")
    levels = np.unique(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)).size
    if levels <= MAX_LEVELS_GRAPHIC:
        raise NotAChestXray(
            f"only {levels} distinct grey levels: a synthetic graphic (a test pattern, a diagram or a mask?), "
            f"not a radiograph (refused at {MAX_LEVELS_GRAPHIC} or fewer)"
        )


def segmentation_warnings(mask_area_fraction: float, left_right_balance: float, rejected_reason: str | None) -> list[InputWarning]:
    """Warnings from the lung segmentation of one image (`PreprocessedImage` fields).

    A segmentation that preprocessing rejected (empty mask, crop too small) or whose lung
    area or left/right balance lies outside `LUNG_AREA_PLAUSIBLE` / `LUNG_BALANCE_PLAUSIBLE`
    means the model input is not what training saw — or the image is not a frontal chest
    radiograph (a lateral view gives one lung field: an extreme balance).

    Example:
        >>> [w.code for w in segmentation_warnings(0.3, 0.5, None)]
        []
        >>> [w.code for w in segmentation_warnings(0.02, 0.95, None)]
        ['implausible_segmentation']
    """
    if rejected_reason:
        return [InputWarning("segmentation_rejected", f"lung segmentation rejected: {rejected_reason}; the model input is not what training saw")]
    problems = []
    if not LUNG_AREA_PLAUSIBLE[0] <= mask_area_fraction <= LUNG_AREA_PLAUSIBLE[1]:
        problems.append(f"lung area is {mask_area_fraction:.0%} of the image (plausible: {LUNG_AREA_PLAUSIBLE[0]:.0%}-{LUNG_AREA_PLAUSIBLE[1]:.0%})")
    if not (left_right_balance == left_right_balance) or not LUNG_BALANCE_PLAUSIBLE[0] <= left_right_balance <= LUNG_BALANCE_PLAUSIBLE[1]:
        shown = "undefined" if left_right_balance != left_right_balance else f"{left_right_balance:.2f}"
        problems.append(f"left/right lung balance is {shown} (plausible: {LUNG_BALANCE_PLAUSIBLE[0]}-{LUNG_BALANCE_PLAUSIBLE[1]}; "
                        "one lung field suggests a lateral view or a missed lung)")
    if not problems:
        return []
    return [InputWarning("implausible_segmentation", "implausible lung segmentation: " + "; ".join(problems))]


def opacity_cut_warnings(mask: np.ndarray) -> list[InputWarning]:
    """A warning when the lung mask is likely to have cut away an opacity (a shortened lung).

    A consolidated lower zone is as white as the diaphragm, and a U-Net can call it "not
    lung"; the mask then ends above it and that lung is visibly shorter than the other
    (`OPACITY_CUT_HEIGHT_RATIO`). Masking would remove the pathology the classifier reads.

    Args:
        mask: ``(H, W)`` bool full-image lung mask (any resolution).

    Example:
        >>> m = np.zeros((100, 100), bool); m[10:90, 10:40] = True; m[10:50, 60:90] = True
        >>> [w.code for w in opacity_cut_warnings(m)]
        ['possible_opacity_cut']
    """
    from covidcxr.preprocess.lung_coverage import lung_height_ratio

    ratio = lung_height_ratio(mask)
    if not ratio == ratio or ratio >= OPACITY_CUT_HEIGHT_RATIO:
        return []
    return [
        InputWarning(
            "possible_opacity_cut",
            f"one lung of the mask is {1 - ratio:.0%} shorter than the other (expected within "
            f"{1 - OPACITY_CUT_HEIGHT_RATIO:.0%}): the mask may have cut away a dense (consolidated) zone, "
            "and masking removes what the model should read; check the lung-mask overlay",
        )
    ]
