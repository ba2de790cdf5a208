"""One radiograph → one model input: the preprocessing pipeline and its configuration.

A `PreprocessConfig` fully determines the output; its `PreprocessConfig.config_hash`
keys the cache (`covidcxr.preprocess.cache`). The steps, in order, and why this order:

1. **read** (`covidcxr.io.read_image`): float32 ``(H, W)`` in [0, 1], whatever the format.
2. **JPEG harmonisation** (optional; Hall et al. 2020 used quality 90): first, because
   it stands for re-encoding the *file* — every image then carries the same compression
   artefacts before anything else looks at it.
3. **downscale** to the *working resolution* (`working_shape`) by area averaging (Pillow's
   box filter): the smallest size at which every later step still has all the pixels it
   uses — the model input's scale (doubled-ish for ``lungs="crop"``: a crop may be as
   small as ``crop_min_fraction`` of the image side) and never below the lung U-Net's
   256-px input. A 2,000-px film and a 320-px figure then cost the same from here on
   (the U-Net, its post-processing and the equalisation at full resolution were most of
   the latency of a large image); images already at or below it are not touched (never
   upscaled). Area averaging is the anti-aliasing the later Lanczos resize would have
   done anyway.
4. **equalise** the (working-resolution) image (Tartaglione et al. 2020 §3.2: histogram
   equalisation for "uniform image dynamic"): on the whole radiograph, so the mapping does
   not depend on a crop or drown in a masked image's zeros, and before segmenting, so the
   segmenter sees the same dynamic range whatever the source.
5. **segment** the lungs on that equalised image (the U-Net of
   ``covidcxr.preprocess.lungs``, or the manifest's mask brought to the working size by
   nearest neighbour).
6. **crop** (``lungs="crop"``, Ben Ahmed et al. 2021 §II.B) at the working resolution,
   which keeps at least as many pixels across the lungs as the output has.
7. **resize with padding** to ``size``, aspect kept (Apostolopoulos et al. 2020).
8. **mask** (``lungs="mask"``, Tartaglione §3.2): the binary mask is resized with the
   image (nearest neighbour), then blurred with ``blur_radius`` and multiplied in — at
   the *output* resolution. This is the one place where this pipeline departs from
   "mask, then resize": a 3-pixel blur on a 2,000-px film and on a 320-px figure leaves
   edges of very different softness after both are scaled to 224 px, and that softness
   would tell the sources (hence the labels) apart. Blurring at the model input's scale
   gives every image the same 3-px edge.
9. float32 in [0, 1].

Training (the cache, `covidcxr.preprocess.cache`) and inference (``covidcxr predict``,
the service, ``evaluate --data``) all call `preprocess_batch`: one code path, so a cached
model input and the one predict computes for the same file are the same array.

The lung mask is computed for every setting, ``lungs="none"`` included: the audit
(lung-focus saliency) needs to know where the lungs are in every model input.

Example:
    >>> config = PreprocessConfig(lungs="crop", mask_source="manifest", size=(200, 266))
    >>> out = preprocess_image("site/images/0001.png", config, manifest_mask="site/masks/0001.png")  # doctest: +SKIP
    >>> out.image.shape, out.lung_mask.shape, out.rejected_reason  # doctest: +SKIP
    ((200, 266), (200, 266), None)
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from scipy import ndimage

from covidcxr.data.manifest import file_sha1
from covidcxr.errors import CovidCXRError
from covidcxr.io import read_image, read_mask
from covidcxr.preprocess.equalize import equalize, harmonize_jpeg
from covidcxr.preprocess.geometry import (
    BoundingBox,
    CropRejected,
    PadTransform,
    apply_lung_mask,
    crop_to_lungs,
    fit_shape,
    make_pad_transform,
    resize_with_padding,
)
from covidcxr.preprocess.geometry import _resize_mask as resize_mask

# Bump whenever a code change alters any output array or number for the same config:
# it is part of the config hash, so stale cache entries are never read as current.
# 2: images that are not chest radiographs are refused (`covidcxr.preprocess.screening`).
# 3: downscale first (`working_shape`): equalisation, segmentation, crop and lung statistics
#    run at the working resolution instead of the file's own.
PIPELINE_VERSION = 3

# The working resolution's long side is never below this: the lung U-Net's input side
# (``lung_unet.json`` ``input_size``), so the segmenter is never fed an image it must upscale.
WORKING_MIN_LONG_SIDE = 256

# Long side of the QC thumbnails (`PreprocessedImage.original`), in pixels.
QC_SIZE = 192

MaskPath = str | Path | np.ndarray | None


class PreprocessConfigError(CovidCXRError):
    """A preprocessing configuration (YAML or options) has a bad or unknown field.

    Attributes:
        fields: the offending field names.
    """

    def __init__(self, message: str, fields: Sequence[str] = ()):
        self.fields = list(fields)
        super().__init__(message)


class SegmenterUnavailable(CovidCXRError):
    """The lung segmenter (``covidcxr.preprocess.lungs``) cannot be loaded."""


@functools.lru_cache(maxsize=8)
def _file_sha1_at(path: str, size: int, mtime_ns: int) -> str:
    return file_sha1(path)


def _weights_sha1(weights: str | None) -> str | None:
    """SHA-1 over the lung U-Net weights and their metadata file (None: the shipped default).

    The metadata (``lung_unet.json``) holds the threshold and the test-time augmentation
    preset, which change the masks as much as the weights do. None when the files are
    absent: the config still hashes (by name) and the run itself fails later with the
    loader's clear error.
    """
    from covidcxr.preprocess.lungs import resolve_weights

    try:
        files = resolve_weights(weights)
    except CovidCXRError:
        return None
    digests = [_file_sha1_at(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return hashlib.sha1("".join(digests).encode("ascii")).hexdigest()


_SIZE_SCHEMA = {
    "description": "model input size: N (square), 'HxW', or [height, width]",
    "anyOf": [
        {"type": "integer", "minimum": 8, "maximum": 4096},
        {"type": "string", "pattern": "^\\s*\\d+\\s*([xX,]\\s*\\d+\\s*)?$"},
        {"type": "array", "items": {"type": "integer", "minimum": 8, "maximum": 4096}, "minItems": 2, "maxItems": 2},
    ],
}


class PreprocessConfig(BaseModel):
    """Everything that decides the model input; frozen, and hashed to key the cache.

    Attributes:
        equalization: ``"histogram"`` (Tartaglione §3.2), ``"clahe"`` or ``"none"``
            (min-max stretch only).
        jpeg_quality: re-encode as JPEG at this quality before anything else (Hall et al.
            2020: 90); None = off.
        lungs: ``"mask"`` (multiply by the blurred lung mask, Tartaglione §3.2),
            ``"crop"`` (lungs' bounding box, Ben Ahmed §II.B) or ``"none"``.
        mask_source: where lung masks come from: ``"model"`` (the U-Net, for every
            image), ``"manifest"`` (the manifest's ``mask`` column; exact for phantoms;
            rows without one are rejected) or ``"auto"`` (manifest where present, else
            model). The default is ``"model"``: with ``"auto"`` the mask's *style*
            (annotation protocol vs the network's) would follow the source — in the
            shared collection only cohen, montgomery and shenzhen have masks, and V7's
            include the retrocardiac region while the others exclude the heart — a
            source signal handed to the classifier.
        blur_radius: the mask's blurred edge, in output pixels (3 = Tartaglione); 0 = a
            hard mask.
        crop_margin: ``lungs="crop"``: the box grows by this fraction of its own
            height/width on each side.
        crop_min_fraction: ``lungs="crop"``: a crop side below this fraction of the
            image side is rejected (Ben Ahmed: "less than half"; see
            `covidcxr.preprocess.geometry.crop_to_lungs`).
        size: ``(height, width)`` of the model input; an int means a square.
            Apostolopoulos et al. used ``(200, 266)``.
        pad_value: intensity of the padding, in [0, 1].
        segmenter_weights: weights file for the lung U-Net; None = the shipped default.

    Example:
        >>> config = PreprocessConfig(size=256, jpeg_quality=90)
        >>> config.size, len(config.config_hash())
        ((256, 256), 64)
        >>> PreprocessConfig(jpeg_quality=101)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        pydantic_core._pydantic_core.ValidationError: 1 validation error for PreprocessConfig
        jpeg_quality...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    equalization: Literal["histogram", "clahe", "none"] = "histogram"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] | None = None
    lungs: Literal["mask", "crop", "none"] = "mask"
    mask_source: Literal["model", "manifest", "auto"] = "model"
    blur_radius: Annotated[float, Field(ge=0.0, le=50.0)] = 3.0
    crop_margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    crop_min_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    size: Annotated[
        tuple[Annotated[int, Field(ge=8, le=4096)], Annotated[int, Field(ge=8, le=4096)]],
        WithJsonSchema(_SIZE_SCHEMA),  # the forms the validator below accepts, for editors
    ] = (224, 224)
    pad_value: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    segmenter_weights: str | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _size_from_int_or_text(cls, value: Any) -> Any:
        # Accept 224, "224", "200x266" and [200, 266] (YAML and the command line).
        if isinstance(value, bool):
            raise ValueError("size must be an int or (height, width)")
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            try:
                numbers = [int(p.strip()) for p in parts]
            except ValueError:
                raise ValueError(f"size {value!r} is not N or HxW") from None
            if len(numbers) == 1:
                return (numbers[0], numbers[0])
            return tuple(numbers)
        return value

    @field_validator("segmenter_weights", mode="before")
    @classmethod
    def _weights_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    def canonical_json(self) -> str:
        """The fields, `PIPELINE_VERSION` and the segmenter weights' SHA-1 as compact JSON (what is hashed).

        The weights enter by content, not by name, so retrained weights under the same
        file name (or a new shipped default) never serve stale cached masks.
        """
        payload = {"pipeline_version": PIPELINE_VERSION, **self.model_dump(mode="json")}
        if self.uses_model:
            payload["segmenter_sha1"] = _weights_sha1(self.segmenter_weights)
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """SHA-256 (hex) of `canonical_json`: equal configs hash equally in any process.

        """
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    @property
    def uses_model(self) -> bool:
        """Whether any image may need the lung U-Net (``mask_source`` model or auto)."""
        return self.mask_source in ("model", "auto")

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, origin: str = "config") -> "PreprocessConfig":
        """Validate a mapping, turning pydantic's errors into a `PreprocessConfigError`.

        Raises:
            PreprocessConfigError: naming every bad field, its value and what was expected.
        """
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            fields, lines = [], []
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"][:1]) or "?"
                fields.append(field)
                got = f" (got {error['input']!r})" if error["type"] != "missing" else ""
                lines.append(f"field '{field}': {error['msg']}{got}")
            raise PreprocessConfigError(f"{origin}: " + "; ".join(lines), fields) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PreprocessConfig":
        """Read a YAML mapping of fields; non-None ``overrides`` win over the file.

        Raises:
            PreprocessConfigError: unreadable file, not a mapping, or a bad field.
        """
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PreprocessConfigError(f"{path}: cannot read the YAML config: {exc}") from None
        if not isinstance(data, dict):
            raise PreprocessConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(data, origin=str(path))

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default filled in); `from_yaml` reads it back."""
        import yaml

        data = self.model_dump(mode="json")
        data["size"] = list(self.size)
        return yaml.safe_dump(data, sort_keys=False)


@dataclass(eq=False)
class PreprocessedImage:
    """One preprocessed radiograph, with what QC needs to judge it.

    Attributes:
        image: ``config.size`` float32 in [0, 1] — the model input. For a rejected image
            it is the uncropped, unmasked image (for QC only; never train on it).
        lung_mask: ``config.size`` bool, the binary lung mask in the model input's
            geometry (before blurring), e.g. for lung-focus saliency.
        original: ``(h, w)`` float32, the equalised input scaled to a long side of
            `QC_SIZE` (aspect kept, no padding).
        original_mask: ``(h, w)`` bool, the full-image lung mask at ``original``'s size.
        mask_area_fraction: lung pixels / image pixels, on the whole image (at the working
            resolution, `working_shape`).
        left_right_balance: image-left lung area / both lungs' area, in [0, 1]: 0.5 =
            equal lungs, near 0 or 1 = a lung missing (NaN for an empty mask). The lungs
            are the mask's two largest connected components, each assigned to the side of
            its centroid; a mask in one piece is split at the image's middle column.
        crop_box: the lung crop in the pixel coordinates of the image as read (scaled back
            from the working resolution where it was cut; ``lungs="crop"``), else None.
        rejected_reason: why the image must not be used (empty mask, crop too small), or
            None.
        mask_used: ``"manifest"`` or ``"model"``.
        input_shape: ``(H, W)`` of the image as read.
        transform: the `PadTransform` from the (cropped) working-resolution image to ``image``.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    original: np.ndarray
    original_mask: np.ndarray
    mask_area_fraction: float
    left_right_balance: float
    crop_box: BoundingBox | None
    rejected_reason: str | None
    mask_used: str
    input_shape: tuple[int, int]
    transform: PadTransform


class Segmenter(Protocol):
    """What the pipeline needs of a lung segmenter (``covidcxr.preprocess.lungs.LungSegmenter``)."""

    def segment_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``(H, W)`` float images in [0, 1] → ``(H, W)`` bool masks at each image's size."""
        ...


_SEGMENTERS: dict[str | None, Segmenter] = {}


def load_segmenter(weights: str | None = None) -> Segmenter:
    """Load the lung U-Net once per process (``LungSegmenter.load(weights)``), then reuse it.

    Raises:
        SegmenterUnavailable: ``covidcxr.preprocess.lungs`` is missing or cannot load
            ``weights``; the message suggests ``mask_source="manifest"``.
    """
    if weights not in _SEGMENTERS:
        try:
            from covidcxr.preprocess.lungs import LungSegmenter
        except ImportError as exc:
            raise SegmenterUnavailable(
                f"the lung segmenter (covidcxr.preprocess.lungs) is not available ({exc}); "
                "use mask_source='manifest' for collections with lung masks"
            ) from None
        try:
            _SEGMENTERS[weights] = LungSegmenter.load(weights)
        except (CovidCXRError, OSError, ValueError, RuntimeError) as exc:
            raise SegmenterUnavailable(
                f"cannot load the lung segmenter ({weights or 'shipped default weights'}): {exc}; "
                "use mask_source='manifest' for collections with lung masks"
            ) from None
    return _SEGMENTERS[weights]


def soft_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """The blurred mask that multiplies the image: ``lungs.soften_mask`` (radius 0: the mask as 0/1)."""
    if radius <= 0:
        return mask.astype(np.float32)
    # One blur for the whole project (covidcxr.preprocess.lungs owns it, with the U-Net).
    from covidcxr.preprocess.lungs import soften_mask

    return soften_mask(mask, radius=radius)


def pixels_from_array(image: np.ndarray) -> np.ndarray:
    """An image given as an array (not a file) -> ``(H, W)`` float32 grey in [0, 1], as `read_image` gives.

    Raises:
        CovidCXRError: not a finite 2-D array with values in [0, 1] (the message says what it is).
    """
    pixels = np.asarray(image)
    if pixels.ndim != 2 or min(pixels.shape) < 1 or not np.issubdtype(pixels.dtype, np.number):
        raise CovidCXRError(f"image array: expected (H, W) grey numbers in [0, 1]; got shape {pixels.shape}, dtype {pixels.dtype}")
    pixels = pixels.astype(np.float32)
    if not np.isfinite(pixels).all() or float(pixels.min()) < 0.0 or float(pixels.max()) > 1.0:
        raise CovidCXRError(
            f"image array: expected finite values in [0, 1] (divide 8-bit by 255, 16-bit by 65535); "
            f"got range [{np.nanmin(pixels):.4g}, {np.nanmax(pixels):.4g}]"
        )
    return pixels


def working_shape(shape: Sequence[int], config: PreprocessConfig, min_long_side: int = WORKING_MIN_LONG_SIDE) -> tuple[int, int]:
    """The ``(h, w)`` an ``(H, W)`` image is downscaled to before equalisation (step 3).

    The scale is the one `resize_with_padding` will apply to reach ``config.size``; for
    ``lungs="crop"`` it is divided by ``crop_min_fraction`` (an accepted crop is at least
    that fraction of each image side, so it still has the output's pixels); it is raised so
    the long side reaches ``min_long_side`` (the U-Net's input); and it is never above 1.

    Example:
        >>> working_shape((1024, 1024), PreprocessConfig(size=224))
        (256, 256)
        >>> working_shape((2000, 1600), PreprocessConfig(size=224, lungs="crop"))
        (448, 358)
        >>> working_shape((320, 250), PreprocessConfig(size=224, lungs="crop"))  # never upscaled
        (320, 250)
    """
    height, width = int(shape[0]), int(shape[1])
    scale = min(config.size[0] / height, config.size[1] / width)
    if config.lungs == "crop":
        scale /= config.crop_min_fraction
    scale = max(scale, min_long_side / max(height, width))
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def downscale(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-averaging downscale of ``(H, W)`` float32 to ``shape`` (Pillow's box filter; a copy-free no-op at the same size).

    Each output pixel is the mean of the input pixels it covers (fractional at the edges),
    the anti-aliased reduction; Pillow's C resampler keeps it to a few ms for a 2,000-px film.
    """
    if tuple(pixels.shape) == tuple(shape):
        return pixels
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32)).resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _downscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # Nearest neighbour, as every mask resize of the pipeline (geometry.PadTransform.apply).
    return resize_mask(mask, shape)


def load_equalized(path: str | Path | np.ndarray, config: PreprocessConfig, screen: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """Steps 1–4: read, optionally JPEG-harmonise, downscale to `working_shape`, equalise.

    ``path`` may also be an image already in memory: an ``(H, W)`` array of grey values in
    [0, 1] (`pixels_from_array`), e.g. from `covidcxr.train.inference.LoadedRun.predict_array`.

    Args:
        screen: refuse a blank image or a synthetic graphic (`covidcxr.preprocess.screening.screen_pixels`).
            A downscaled image is screened on an equalised *strided* sample of the full-resolution
            pixels (every k-th pixel, k = the reduction rounded up): area averaging would blend a
            graphic's few grey levels into many (a 3,000-px checkerboard reaches hundreds), a
            stride keeps them.

    Returns:
        ``(equalised (h, w) float32 in [0, 1] at the working resolution, (H, W) as read)``.

    Raises:
        ImageReadError: the file cannot be read (naming it and why).
        NotAChestXray: ``screen`` and the image is blank or a graphic.
        CovidCXRError: an array that is not ``(H, W)`` in [0, 1].
    """
    pixels = pixels_from_array(path) if isinstance(path, np.ndarray) else read_image(path).pixels
    if config.jpeg_quality is not None:
        pixels = harmonize_jpeg(pixels, config.jpeg_quality)
    native = (int(pixels.shape[0]), int(pixels.shape[1]))
    shape = working_shape(native, config)
    equalized = equalize(downscale(pixels, shape), config.equalization)
    if screen:
        from covidcxr.preprocess.screening import screen_pixels

        if shape == native:
            screen_pixels(equalized)
        else:
            step = max(-(-native[0] // shape[0]), -(-native[1] // shape[1]))
            screen_pixels(equalize(pixels[::step, ::step], config.equalization))
    return equalized, native


def lung_statistics(mask: np.ndarray) -> tuple[float, float]:
    """``(mask_area_fraction, left_right_balance)`` of a whole-image mask (see `PreprocessedImage`).

    Example:
        >>> mask = np.zeros((10, 10), bool); mask[2:8, 1:4] = True; mask[2:8, 6:8] = True
        >>> lung_statistics(mask)
        (0.3, 0.6)
    """
    mask = np.asarray(mask, dtype=bool)
    total = int(mask.sum())
    if total == 0:
        return 0.0, float("nan")
    labels, count = ndimage.label(mask)
    middle = (mask.shape[1] - 1) / 2
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        largest = np.argsort(sizes)[::-1][:2] + 1
        cols = np.arange(mask.shape[1])
        left = right = 0
        for component in largest:
            region = labels == component
            area = int(region.sum())
            centroid = float((region.sum(axis=0) * cols).sum()) / area
            if centroid <= middle:
                left += area
            else:
                right += area
    else:
        columns = mask.sum(axis=0)
        left = int(columns[: int(np.floor(middle)) + 1].sum())
        right = total - left
    both = left + right
    return round(total / mask.size, 6), round(left / both, 6)


def _thumbnail(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = fit_shape(image.shape, (QC_SIZE, QC_SIZE))
    transform = make_pad_transform(image.shape, shape)
    return transform.apply(image), transform.apply(mask)


def _native_box(box: BoundingBox, working: tuple[int, int], native: tuple[int, int]) -> BoundingBox:
    """A box cut at the working resolution, in the coordinates of the image as read."""
    if working == native:
        return box
    sy, sx = native[0] / working[0], native[1] / working[1]
    return BoundingBox(round(box.top * sy), round(box.left * sx), round(box.bottom * sy), round(box.right * sx))


def _finish(
    equalized: np.ndarray, mask: np.ndarray, config: PreprocessConfig, mask_used: str, native_shape: tuple[int, int]
) -> PreprocessedImage:
    """Steps 6–9 for one working-resolution image whose lung mask is known."""
    area, balance = lung_statistics(mask)
    original, original_mask = _thumbnail(equalized, mask)
    rejected: str | None = None
    crop_box: BoundingBox | None = None
    source, source_mask = equalized, mask
    if config.lungs == "crop":
        try:
            source, crop_box = crop_to_lungs(equalized, mask, config.crop_margin, config.crop_min_fraction)
            source_mask = mask[crop_box.slices]
        except CropRejected as exc:
            rejected = exc.reason
    elif config.lungs == "mask" and area == 0.0:
        # Ben Ahmed §II.B: a blank mask is a failed segmentation; masking would leave black.
        rejected = "empty lung mask: masking would leave a black image"
    image, transform = resize_with_padding(source, config.size, config.pad_value)
    lung_mask = transform.apply(source_mask)
    if config.lungs == "mask" and rejected is None:
        image = apply_lung_mask(image, soft_mask(lung_mask, config.blur_radius))
    return PreprocessedImage(
        image=np.clip(image, 0.0, 1.0).astype(np.float32, copy=False),
        lung_mask=lung_mask,
        original=original,
        original_mask=original_mask,
        mask_area_fraction=area,
        left_right_balance=balance,
        crop_box=None if crop_box is None else _native_box(crop_box, tuple(equalized.shape), native_shape),
        rejected_reason=rejected,
        mask_used=mask_used,
        input_shape=native_shape,
        transform=transform,
    )


def mask_origin(config: PreprocessConfig, manifest_mask: MaskPath) -> str:
    """``"manifest"`` or ``"model"``: where this image's lung mask comes from.

    Raises:
        CovidCXRError: ``mask_source="manifest"`` and the row has no mask.
    """
    has_mask = manifest_mask is not None and not (isinstance(manifest_mask, str) and not manifest_mask.strip())
    if config.mask_source == "model":
        return "model"
    if has_mask:
        return "manifest"
    if config.mask_source == "manifest":
        raise CovidCXRError("no lung mask in the manifest's 'mask' column (mask_source='manifest'; use 'auto' or 'model')")
    return "model"


def preprocess_batch(
    items: Sequence[tuple[str | Path | np.ndarray, MaskPath]],
    config: PreprocessConfig,
    segmenter: Segmenter | None = None,
    screen: bool = False,
) -> list[PreprocessedImage | CovidCXRError]:
    """Preprocess several images, segmenting those that need the U-Net in one batch.

    Args:
        items: ``(image, manifest mask)`` pairs; the image is a file or an ``(H, W)`` array in
            [0, 1] (`load_equalized`); the mask is a path, a bool array of the image's
            shape as read, or None (either is brought to the working resolution).
        config: the pipeline settings.
        segmenter: a loaded segmenter (anything with ``segment_batch``); None loads the
            configured one when an image needs it (`load_segmenter`).
        screen: refuse what is not a chest radiograph (colour photograph, extreme aspect,
            tiny, non-radiograph DICOM modality, blank, test pattern) with the one check
            training and inference share (`covidcxr.preprocess.screening`).

    Returns:
        One entry per item, in order: a `PreprocessedImage`, or the `CovidCXRError` that
        made it unusable (unreadable image or mask, missing manifest mask, refused by the
        screening) — the caller reports it; other exceptions are bugs and propagate.
    """
    from covidcxr.io.image import DEFAULT_MAX_PIXELS
    from covidcxr.preprocess.screening import inspect_input

    results: list[PreprocessedImage | CovidCXRError | None] = [None] * len(items)
    prepared: list[tuple[int, np.ndarray, np.ndarray | None, str, tuple[int, int]]] = []
    for position, (path, manifest_mask) in enumerate(items):
        try:
            origin = mask_origin(config, manifest_mask)
            if screen and not isinstance(path, np.ndarray):  # an array has no file header to screen
                inspect_input(path, DEFAULT_MAX_PIXELS)
            equalized, native = load_equalized(path, config, screen=screen)
            mask = None
            if origin == "manifest":
                if isinstance(manifest_mask, np.ndarray):
                    mask = np.asarray(manifest_mask, dtype=bool)
                    if mask.shape != native:
                        raise CovidCXRError(f"manifest mask shape {mask.shape} differs from the image's {native}")
                else:
                    mask = read_mask(manifest_mask, shape=native)
                mask = _downscale_mask(mask, equalized.shape)
            prepared.append((position, equalized, mask, origin, native))
        except CovidCXRError as exc:
            results[position] = exc
    need = [entry for entry in prepared if entry[2] is None]
    if need:
        # The U-Net is the costly step: one forward pass for the whole batch.
        model = segmenter if segmenter is not None else load_segmenter(config.segmenter_weights)
        images = [entry[1] for entry in need]
        masks = model.segment_batch(images) if hasattr(model, "segment_batch") else [model.segment(i) for i in images]
        segmented = {entry[0]: np.asarray(m, dtype=bool) for entry, m in zip(need, masks)}
    else:
        segmented = {}
    for position, equalized, mask, origin, native in prepared:
        mask = segmented[position] if mask is None else mask
        if mask.shape != equalized.shape:
            raise ValueError(f"the segmenter returned a {mask.shape} mask for a {equalized.shape} image")
        results[position] = _finish(equalized, mask, config, origin, native)
    return results  # type: ignore[return-value]


def preprocess_image(
    path: str | Path,
    config: PreprocessConfig,
    segmenter: Segmenter | None = None,
    manifest_mask: MaskPath = None,
) -> PreprocessedImage:
    """Preprocess one radiograph (see the module docstring for the steps).

    Args:
        path: the image file (any format `covidcxr.io.read_image` reads).
        config: the pipeline settings.
        segmenter: a loaded segmenter; None loads the configured one if needed.
        manifest_mask: the manifest's lung mask (path or ``(H, W)`` bool array), used when
            ``config.mask_source`` is ``"manifest"`` or ``"auto"``.

    Returns:
        The `PreprocessedImage`; check ``rejected_reason`` before training on it.

    Raises:
        ImageReadError: the image or mask cannot be read.
        CovidCXRError: ``mask_source="manifest"`` without a mask.
        SegmenterUnavailable: the U-Net is needed and cannot be loaded.

    Example:
        >>> config = PreprocessConfig(lungs="mask", mask_source="manifest")
        >>> out = preprocess_image("images/p1.png", config, manifest_mask="masks/p1.png")  # doctest: +SKIP
        >>> out.image.shape, out.image.dtype, round(out.mask_area_fraction, 2)  # doctest: +SKIP
        ((224, 224), dtype('float32'), 0.27)
    """
    (result,) = preprocess_batch([(path, manifest_mask)], config, segmenter)
    if isinstance(result, CovidCXRError):
        raise result
    return result
