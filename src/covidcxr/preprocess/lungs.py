"""Lung segmentation: a small MONAI U-Net, its pre/post-processing, soft masks and metrics.

Why: the first defence against shortcut learning is to show the classifier nothing but
the lungs. "We train a U-Net on Montgomery County X-ray Set and Shenzhen Hospital X-ray
Set. The lung masks obtained are then blurred to avoid sharp edges using a 3 pixel
radius" (Tartaglione et al. 2020, §3.2); text, arrows, devices and the image border then
cannot drive the classifier (their Figure 2; Ben Ahmed et al. 2021, §II.B crop to the
lung field for the same reason).

Pipeline of `LungSegmenter` (callers pass the raw ``(H, W)`` float image in [0, 1]):

1. `prepare_image`: aspect-preserving resize so the long side is the network's input size
   (256), global histogram equalisation (Tartaglione et al. §3.2, `equalize_histogram`),
   centred zero padding to a square. The `Placement` records how to undo it.
2. The U-Net (MONAI ``UNet``, 2-D, 1 input channel). Output channels are *annotation
   conventions* (see `CONVENTIONS`): ``heart_excluded`` (Montgomery/Shenzhen/General
   Blockchain: the lung fields without the heart shadow; the default, as in the paper)
   and ``retrocardiac`` (V7 Labs: lungs including the region behind the heart). Making
   the convention an explicit output — instead of letting one head learn "V7 style for
   Cohen-looking images, NLM style for the others" — keeps the mask shape independent
   of the image's source, so the mask itself cannot become a source shortcut.
3. `restore_probability`: crop the padding and resize the probability map back to the
   image's own ``(H, W)`` (bilinear), so thresholding happens at full resolution.
4. `postprocess_mask`: threshold, keep the two largest connected components (two lungs),
   fill holes.

Optional test-time augmentation (``tta``, see `TTA_PRESETS`): steps 1–3 are repeated for
a few *views* of the image — other scales of the long side inside the canvas, small
translations — and the restored probability maps are averaged before step 4. There are
no horizontal flips: the lungs are asymmetric (heart, left hilum, diaphragm heights).
The shipped default is ``"none"`` (one identity view). ``"multiscale"`` was the best
preset on the validation patients, but its gain there was too small to separate from
noise, so it is opt-in (``weights/MODEL_CARD.md``).

`soften_mask` then blurs the mask edge with the paper's 3-pixel radius before it is
multiplied into the image by the later preprocessing stages.

Weights: ``weights/lung_unet.pt`` (a plain state dict, read with
``torch.load(weights_only=True)``, so loading never executes code) plus
``weights/lung_unet.json`` (architecture, input size, threshold, training summary, the
held-out split and metrics); see ``weights/MODEL_CARD.md``. Nothing is ever downloaded.

Example:
    >>> from covidcxr.io import read_image
    >>> segmenter = LungSegmenter.load()  # the shipped weights  # doctest: +SKIP
    >>> image = read_image("cxr.png").pixels  # (H, W) float32 in [0, 1]  # doctest: +SKIP
    >>> lungs = segmenter.segment(image)  # (H, W) bool  # doctest: +SKIP
    >>> soft = soften_mask(lungs)  # (H, W) float32, edges blurred over 3 px  # doctest: +SKIP
    >>> lung_only = image * soft  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.preprocess.equalize import equalize_histogram

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "lung_unet.pt"

HEART_EXCLUDED = "heart_excluded"
RETROCARDIAC = "retrocardiac"
#: Annotation conventions, one per output channel, in channel order.
CONVENTIONS: tuple[str, ...] = (HEART_EXCLUDED, RETROCARDIAC)
#: Mask annotators whose masks include the retrocardiac lung (the manifest's ``mask_source``);
#: every other annotator (NLM Montgomery/Shenzhen, General Blockchain, the phantoms) excludes the heart.
RETROCARDIAC_MASK_SOURCES: frozenset[str] = frozenset({"v7labs"})


def mask_convention(mask_source: object) -> str:
    """The annotation convention of a mask, from the manifest's ``mask_source`` text.

    Example:
        >>> mask_convention("v7labs"), mask_convention("manual_shenzhen"), mask_convention(None)
        ('retrocardiac', 'heart_excluded', 'heart_excluded')
    """
    if isinstance(mask_source, str) and mask_source.strip().lower() in RETROCARDIAC_MASK_SOURCES:
        return RETROCARDIAC
    return HEART_EXCLUDED


# ---------------------------------------------------------------- configuration and network


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything needed to rebuild the network and its pre/post-processing.

    Attributes:
        input_size: side of the square network input (images are fitted into it).
        channels: U-Net feature channels per level (MONAI ``UNet(channels=...)``).
        strides: down-sampling stride between levels (``len(channels) - 1`` entries).
        num_res_units: residual units per block (MONAI; 0 = plain conv blocks).
        norm: MONAI normalisation name (``"batch"`` or ``"instance"``).
        conventions: the annotation convention of each output channel, in order.
        default_convention: the channel `LungSegmenter.segment` uses unless told otherwise.
        threshold: probability above which a pixel is lung.
        equalization: ``"histogram"`` (Tartaglione et al. §3.2) — applied in `prepare_image`.
        tta: the test-time augmentation preset `LungSegmenter` uses unless told otherwise
            (a `TTA_PRESETS` name; ``"none"`` = the single identity view).
    """

    input_size: int = 256
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    norm: str = "batch"
    conventions: tuple[str, ...] = CONVENTIONS
    default_convention: str = HEART_EXCLUDED
    threshold: float = 0.5
    equalization: str = "histogram"
    tta: str = "none"

    def __post_init__(self) -> None:
        if self.tta not in TTA_PRESETS:
            raise CovidCXRError(f"unknown test-time augmentation preset {self.tta!r}; expected one of {list(TTA_PRESETS)}")
        if len(self.strides) != len(self.channels) - 1:
            raise CovidCXRError(f"U-Net needs len(strides) == len(channels) - 1, got {self.strides} for {self.channels}")
        unknown = [c for c in self.conventions if c not in CONVENTIONS]
        if unknown or not self.conventions:
            raise CovidCXRError(f"unknown mask conventions {unknown}; expected some of {list(CONVENTIONS)}")
        if self.default_convention not in self.conventions:
            raise CovidCXRError(f"default convention {self.default_convention!r} is not one of {list(self.conventions)}")
        if self.input_size % int(np.prod(self.strides)) != 0:
            raise CovidCXRError(f"input size {self.input_size} must be divisible by the total stride {int(np.prod(self.strides))}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmenterConfig:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


def build_unet(config: SegmenterConfig) -> torch.nn.Module:
    """The MONAI U-Net described by ``config``: ``(B, 1, S, S)`` -> ``(B, C, S, S)`` logits.

    Example:
        >>> net = build_unet(SegmenterConfig(input_size=64, channels=(4, 8), strides=(2,)))
        >>> tuple(net(torch.zeros(2, 1, 64, 64)).shape)
        (2, 2, 64, 64)
    """
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=len(config.conventions),
        channels=tuple(config.channels),
        strides=tuple(config.strides),
        num_res_units=config.num_res_units,
        norm=config.norm,
    )


# ---------------------------------------------------------------- geometry: image <-> network input


@dataclass(frozen=True)
class Placement:
    """Where an image sits inside the square network input (to undo `prepare_image`).

    Attributes:
        shape: the original ``(H, W)``.
        size: the square input side.
        inner: ``(h, w)`` of the resized image inside the square.
        offset: ``(top, left)`` of the resized image inside the square.
    """

    shape: tuple[int, int]
    size: int
    inner: tuple[int, int]
    offset: tuple[int, int]


def placement_for(shape: Sequence[int], size: int) -> Placement:
    """Aspect-preserving fit of an ``(H, W)`` image into a ``size`` square, centred.

    Example:
        >>> placement_for((320, 240), 256)
        Placement(shape=(320, 240), size=256, inner=(256, 192), offset=(0, 32))
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise CovidCXRError(f"cannot segment an empty image of shape {tuple(shape)}")
    scale = size / max(height, width)
    inner = (max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale))))
    offset = ((size - inner[0]) // 2, (size - inner[1]) // 2)
    return Placement((height, width), size, inner, offset)


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(..., H, W)`` float32 to ``shape``; anti-aliased when shrinking."""
    if tuple(array.shape[-2:]) == tuple(shape):
        return array.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    lead = tensor.shape[:-2]
    tensor = tensor.reshape(1, -1, *tensor.shape[-2:])
    shrinking = shape[0] < tensor.shape[-2] or shape[1] < tensor.shape[-1]
    out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.reshape(*lead, *shape).numpy()


def _pad(inner: np.ndarray, placement: Placement) -> np.ndarray:
    out = np.zeros((*inner.shape[:-2], placement.size, placement.size), dtype=np.float32)
    top, left = placement.offset
    out[..., top : top + placement.inner[0], left : left + placement.inner[1]] = inner
    return out


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise CovidCXRError(f"lung segmentation expects a 2-D (H, W) grey image, got shape {image.shape}")
    return np.clip(np.nan_to_num(image.astype(np.float32, copy=False)), 0.0, 1.0)


def _fill_canvas(image: np.ndarray, placement: Placement, equalization: str) -> np.ndarray:
    """Resize ``image`` into its placement, equalise it, and pad it onto the square canvas."""
    resized = np.clip(_resize(image, placement.inner), 0.0, 1.0)
    if equalization == "histogram":
        resized = equalize_histogram(resized)
    elif equalization != "none":
        raise CovidCXRError(f"unknown equalization {equalization!r} for lung segmentation; expected 'histogram' or 'none'")
    return _pad(resized, placement)


def prepare_image(image: np.ndarray, size: int = 256, equalization: str = "histogram") -> tuple[np.ndarray, Placement]:
    """Fit an image into the network's square input: resize, equalise, pad.

    The resize comes first so equalisation costs the same for a 320 px PNG and a 3000 px
    DICOM; global histogram equalisation is the paper's intensity harmonisation
    (Tartaglione et al. §3.2). The padding stays 0 (black, like collimated air).

    Args:
        image: ``(H, W)`` float in [0, 1] (the raw output of `covidcxr.io.read_image`).
        size: side of the square input.
        equalization: ``"histogram"`` or ``"none"``.

    Returns:
        ``((size, size) float32 in [0, 1], Placement)``.

    Example:
        >>> x, where = prepare_image(np.random.default_rng(0).random((320, 240)), 256)
        >>> x.shape, where.inner, where.offset
        ((256, 256), (256, 192), (0, 32))
    """
    image = _check_image(image)
    placement = placement_for(image.shape, size)
    return _fill_canvas(image, placement, equalization), placement


def prepare_mask(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """Map an ``(H, W)`` mask into the network input like `prepare_image` maps its image.

    Returns:
        ``(size, size)`` bool (area-weighted resize thresholded at 0.5).
    """
    mask = np.asarray(mask)
    if mask.shape != placement.shape:
        raise CovidCXRError(f"mask shape {mask.shape} differs from its image's {placement.shape}")
    return _pad(_resize(mask.astype(np.float32), placement.inner), placement) > 0.5


def restore_probability(probability: np.ndarray, placement: Placement) -> np.ndarray:
    """Undo `prepare_image` on a network output: crop the padding, resize to ``(H, W)``.

    Args:
        probability: ``(size, size)`` or ``(C, size, size)`` float.
        placement: from `prepare_image`.

    Returns:
        float32 of shape ``(H, W)`` (or ``(C, H, W)``) in [0, 1].
    """
    top, left = placement.offset
    inner = probability[..., top : top + placement.inner[0], left : left + placement.inner[1]]
    return np.clip(_resize(inner, placement.shape), 0.0, 1.0)


# ---------------------------------------------------------------- test-time augmentation views


@dataclass(frozen=True)
class TTAView:
    """One test-time view of an image: its scale and position inside the network input.

    Attributes:
        scale: long side of the resized image as a fraction of the input size (1.0 = the
            plain path: long side 256 px in a 256 px canvas; 1.0625 = 272 px).
        shift: ``(dy, dx)`` translation of the image as a fraction of the input size
            (0.03125 = 8 px at 256), added to the centred offset.

    The canvas is the input size, grown to the next multiple of the network's total stride
    when the scaled and shifted image would not fit, so no part of the image is cropped
    (the U-Net is fully convolutional). The identity view reproduces `prepare_image` exactly.
    """

    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)


#: Named test-time augmentation presets. No flips (the lungs are not mirror-symmetric).
#: Validation Dice of each, and the cost, are in ``weights/MODEL_CARD.md``.
TTA_PRESETS: dict[str, tuple[TTAView, ...]] = {
    "none": (TTAView(),),
    # long side 256 and 272 px in the 256 canvas (the 272 view runs on a 272 canvas)
    "multiscale": (TTAView(1.0), TTAView(17 / 16)),
    # long side 240, 256 and 272 px
    "multiscale3": (TTAView(15 / 16), TTAView(1.0), TTAView(17 / 16)),
    # the three scales plus the four diagonal shifts by 8 px at 256
    "multiscale3_shift": (
        TTAView(15 / 16),
        TTAView(1.0),
        TTAView(17 / 16),
        *(TTAView(1.0, (dy / 32, dx / 32)) for dy in (-1, 1) for dx in (-1, 1)),
    ),
}
#: The preset ``tta=True`` selects when the weights' own default is ``"none"``.
DEFAULT_TTA_PRESET = "multiscale"

TTASpec = bool | str | Sequence[TTAView] | None


def tta_name(views: Sequence[TTAView]) -> str:
    """The `TTA_PRESETS` name of a view tuple, or a description of custom views.

    Example:
        >>> tta_name(TTA_PRESETS["multiscale"]), tta_name((TTAView(0.5),))
        ('multiscale', 'custom: scale 0.5 shift (0.0, 0.0)')
    """
    for name, preset in TTA_PRESETS.items():
        if tuple(views) == preset:
            return name
    return "custom: " + "; ".join(f"scale {v.scale:g} shift {tuple(v.shift)}" for v in views)


def resolve_tta(tta: TTASpec, default: str = "none") -> tuple[TTAView, ...]:
    """The views of a TTA request.

    Args:
        tta: None = ``default``; False = the single identity view; True = ``default``,
            or `DEFAULT_TTA_PRESET` when ``default`` is ``"none"``; a `TTA_PRESETS` name; or a
            sequence of `TTAView` (or ``(scale, (dy, dx))`` tuples).
        default: the weights' configured preset (``config.tta``).

    Example:
        >>> [v.scale for v in resolve_tta(True)], len(resolve_tta(False)), len(resolve_tta("multiscale3"))
        ([1.0, 1.0625], 1, 3)
    """
    if tta is None:
        tta = default
    if tta is False:
        tta = "none"
    elif tta is True:
        tta = default if default != "none" else DEFAULT_TTA_PRESET
    if isinstance(tta, str):
        if tta not in TTA_PRESETS:
            raise CovidCXRError(f"unknown test-time augmentation preset {tta!r}; expected one of {list(TTA_PRESETS)}")
        return TTA_PRESETS[tta]
    views = tuple(v if isinstance(v, TTAView) else TTAView(float(v[0]), tuple(v[1]) if len(v) > 1 else (0.0, 0.0)) for v in tta)
    if not views or any(v.scale <= 0 for v in views):
        raise CovidCXRError(f"test-time augmentation needs at least one view with a positive scale, got {tta!r}")
    return views


def prepare_view(
    image: np.ndarray, size: int = 256, equalization: str = "histogram", view: TTAView = TTAView(), multiple: int = 16
) -> tuple[np.ndarray, Placement]:
    """Like `prepare_image`, for one test-time view: the long side is ``round(size * view.scale)``,
    shifted by ``view.shift * size`` pixels, in a square canvas of at least ``size`` px grown to
    a multiple of ``multiple`` (the network's total stride) so nothing is cropped.

    Returns:
        ``((canvas, canvas) float32 in [0, 1], Placement)``; `restore_probability` undoes it.

    Example:
        >>> image = np.random.default_rng(0).random((320, 240))
        >>> x, where = prepare_view(image, 256, view=TTAView(17 / 16))
        >>> x.shape, where.inner, where.offset
        ((272, 272), (272, 204), (0, 34))
        >>> bool(np.array_equal(prepare_view(image, 256)[0], prepare_image(image, 256)[0]))
        True
    """
    if view == TTAView():
        return prepare_image(image, size, equalization)
    image = _check_image(image)
    long_side = max(1, round(size * view.scale))
    dy, dx = (round(f * size) for f in view.shift)
    needed = max(size, long_side + 2 * max(abs(dy), abs(dx)))
    canvas = int(math.ceil(needed / multiple) * multiple)
    fitted = placement_for(image.shape, long_side)
    offset = ((canvas - fitted.inner[0]) // 2 + dy, (canvas - fitted.inner[1]) // 2 + dx)
    placement = Placement(fitted.shape, canvas, fitted.inner, offset)
    return _fill_canvas(image, placement, equalization), placement


# ---------------------------------------------------------------- post-processing and soft masks


#: 8-connectivity: pixels touching at a corner belong to one component (MONAI's and scikit-image's default in 2-D).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def keep_largest_components(mask: np.ndarray, count: int = 2) -> np.ndarray:
    """The ``count`` largest 8-connected components of a bool mask.

    The rule of MONAI's ``KeepLargestConnectedComponent(num_components=count)`` (label,
    ``bincount``, ``argsort`` descending — so ties break the same way; the tests compare the
    two), on SciPy's ``ndimage.label``: about 3x faster per mask, without MONAI's
    tensor/transform overhead, on the latency path of every prediction.
    """
    labels, found = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if found <= count:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.zeros(sizes.shape[0], dtype=bool)
    keep[np.argsort(sizes)[::-1][:count]] = True
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with its default (4-connected background), by labelling.

    The background components that do not touch the image border are the holes. SciPy's
    function grows the border inwards by repeated dilation — tens of passes for a large
    hole; one labelling pass gives the identical mask (the tests compare the two) ~2x faster.
    """
    labels, found = ndimage.label(~mask)
    if found == 0:
        return mask.copy()
    outside = np.zeros(found + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = False
    return ~outside[labels]


def postprocess_mask(probability_or_mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Threshold, keep the two largest connected components (the two lungs), fill holes.

    Keeping the two largest components (`keep_largest_components`, MONAI's
    ``KeepLargestConnectedComponent(num_components=2)`` rule) keeps the lungs and drops stray
    specks (text, a bright device read as air); holes — a dense consolidation the network
    called "not lung" — are filled (`fill_holes`, SciPy's ``binary_fill_holes`` result).

    Args:
        probability_or_mask: ``(H, W)`` float probabilities or a bool mask.
        threshold: probabilities strictly above it are foreground (ignored for bool input).

    Returns:
        ``(H, W)`` bool with at most two 8-connected components and no holes.

    Example:
        >>> p = np.zeros((40, 40)); p[5:35, 3:15] = p[5:35, 20:37] = 0.9; p[1, 1] = 0.9; p[20, 8] = 0.1
        >>> m = postprocess_mask(p)
        >>> bool(m[1, 1]), bool(m[20, 8]), int(m.sum())
        (False, True, 870)
    """
    array = np.asarray(probability_or_mask)
    if array.ndim != 2:
        raise CovidCXRError(f"postprocess_mask expects a 2-D (H, W) array, got shape {array.shape}")
    mask = array.astype(bool) if array.dtype == bool else array > threshold
    if not mask.any():
        return mask
    return fill_holes(keep_largest_components(mask, 2))


def soften_mask(mask: np.ndarray, radius: float = 3.0) -> np.ndarray:
    """Blur a mask's edge over ``radius`` pixels: "blurred to avoid sharp edges using a 3 pixel
    radius" (Tartaglione et al. 2020, §3.2).

    The paper does not name the kernel. We use a Gaussian with ``sigma = radius / 2``
    truncated at exactly ``radius`` pixels (SciPy ``truncate=2``), so the blur reaches
    ``radius`` pixels from the edge and no further: pixels more than ``radius`` px inside
    stay exactly 1, pixels more than ``radius`` px outside exactly 0, and the edge becomes
    a smooth ramp (a sharp mask edge would itself be a strong, easy feature for the
    classifier). The image border is extended ("nearest"), so lungs touching it do not fade.

    Args:
        mask: ``(H, W)`` bool (or 0/1) lung mask, at the resolution it will be applied.
        radius: blur radius in pixels of that resolution; 0 returns the mask as float.

    Returns:
        ``(H, W)`` float32 in [0, 1].

    Example:
        >>> m = np.zeros((21, 21), bool); m[:, 10:] = True
        >>> s = soften_mask(m)
        >>> float(s[0, 6]), float(s[0, 14]), bool(0.0 < s[0, 9] < 0.5 < s[0, 10] < 1.0)
        (0.0, 1.0, True)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise CovidCXRError(f"soften_mask expects a 2-D (H, W) mask, got shape {mask.shape}")
    if radius < 0:
        raise CovidCXRError(f"soften_mask radius must be >= 0 pixels, got {radius}")
    values = mask.astype(np.float32)
    if radius == 0:
        return values
    blurred = ndimage.gaussian_filter(values, sigma=radius / 2.0, truncate=2.0, mode="nearest")
    return np.clip(blurred, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- weights on disk


def resolve_weights(weights: str | Path | None) -> tuple[Path, Path]:
    """``(state dict .pt, metadata .json)`` for a weights file, a folder holding ``lung_unet.pt``, or None."""
    path = DEFAULT_WEIGHTS if weights is None else Path(weights)
    if path.is_dir():
        path = path / DEFAULT_WEIGHTS.name
    if not path.is_file():
        hint = " (the default weights ship with covidcxr; reinstall it or train some with `covidcxr segment train`)" if weights is None else ""
        raise CovidCXRError(f"lung segmentation weights {path} do not exist{hint}")
    metadata = path.with_suffix(".json")
    if not metadata.is_file():
        raise CovidCXRError(f"lung segmentation weights {path} have no metadata file {metadata} (architecture, input size); it must sit beside them")
    return path, metadata


def read_metadata(weights: str | Path | None = None) -> dict[str, Any]:
    """The ``lung_unet.json`` beside a weights file (architecture, training summary, split, metrics)."""
    _, metadata_path = resolve_weights(weights)
    try:
        return json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CovidCXRError(f"cannot read lung segmentation metadata {metadata_path}: {exc}") from None


def save_weights(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    config: SegmenterConfig,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``path`` (a state dict) and ``path.with_suffix('.json')`` (config + metadata), atomically.

    Args:
        model: the network or its state dict.
        config: its architecture and processing settings (stored under ``"config"``).
        path: the ``.pt`` file (or a folder: ``lung_unet.pt`` inside it).
        metadata: anything JSON-serialisable to store beside the config.
        half: store floating tensors as float16 (half the size; `LungSegmenter.load` upcasts).

    Returns:
        the ``.pt`` path.
    """
    path = Path(path)
    if path.suffix != ".pt":
        path = path / DEFAULT_WEIGHTS.name
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    dtype = torch.float16 if half else torch.float32
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    payload = {"format": "covidcxr-lung-unet/1", "config": config.to_dict(), "stored_dtype": str(dtype).removeprefix("torch.")}
    payload.update(dict(metadata or {}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(payload, indent=2, default=str) + "\n")
    for written in (path, path.with_suffix(".json")):
        written.chmod(0o644)  # atomic writes create 0600 temp files; weights are package data, world-readable
    return path


def load_model(weights: str | Path | None = None) -> tuple[torch.nn.Module, SegmenterConfig, dict[str, Any]]:
    """Rebuild the U-Net from a weights file; ``(model in eval mode, config, metadata)``.

    Raises:
        CovidCXRError: naming the file, if it is missing, unreadable or does not fit the architecture.
    """
    path, metadata_path = resolve_weights(weights)
    metadata = read_metadata(path)
    if "config" not in metadata:
        raise CovidCXRError(f"lung segmentation metadata {metadata_path} has no 'config' (architecture) entry")
    config = SegmenterConfig.from_dict(metadata["config"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or non-torch file
        raise CovidCXRError(f"cannot read lung segmentation weights {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CovidCXRError(f"lung segmentation weights {path} are not a state dict of tensors")
    model = build_unet(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CovidCXRError(f"lung segmentation weights {path} do not fit the architecture in {metadata_path}: {exc}") from None
    return model.eval(), config, metadata


# ---------------------------------------------------------------- the segmenter


def bf16_pays() -> bool:
    """Whether bf16 autocast speeds a CPU forward pass up here: only with AMX tiles (Sapphire Rapids and later).

    Without AMX, oneDNN runs bf16 convolutions through AVX-512-BF16 dot products plus
    conversions, which on this project's CPU made the U-Net ~1.4x *slower* than float32
    (and changes the masks a little); with AMX it is 2-3x faster.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode MONAI network with every BatchNorm folded into the convolution before it.

    MONAI's ``Convolution`` blocks are ``conv -> ADN(N=BatchNorm, D, A)``; in eval mode the
    normalisation is an affine map per channel, which PyTorch's
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` folds into the convolution's weights and bias
    (transposed convolutions too). One pass fewer per block: the shipped U-Net ~12 % faster
    on CPU, probabilities within ~2e-6 of the unfolded network (float32 rounding; tested).
    The original module is left as it was (it may still be trained).
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        conv, adn = getattr(module, "conv", None), getattr(module, "adn", None)
        norm = getattr(adn, "N", None)
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and isinstance(norm, torch.nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, torch.nn.ConvTranspose2d))
            adn.N = torch.nn.Identity()
    return folded


class LungSegmenter:
    """Segment the lungs of chest radiographs of any size with a trained U-Net.

    Args:
        model: the U-Net (`build_unet`), weights loaded.
        config: its `SegmenterConfig`.
        fast: run the network with its BatchNorms folded into the convolutions
            (`fold_batch_norms`) on channels-last tensors, under bf16 autocast only where
            the CPU has AMX tiles (`bf16_pays`). Measured on this project's AVX-512 CPU
            without AMX (``benchmarks/bench_serve.py``, one thread): float32 channels-last
            ~23 ms per 256-px image, bf16 autocast ~32-37 ms — bf16 there is emulated and
            costs more than it saves. False runs plain float32, contiguous.
        batch_size: images per forward pass in the batch methods.
        metadata: the weights' metadata (training summary, split, metrics).
        tta: test-time augmentation (see `resolve_tta`): None = the weights' ``config.tta``
            (``"none"`` for the shipped weights), False = off, True = the ``"multiscale"``
            preset, a `TTA_PRESETS` name, or a sequence of `TTAView`. Each view costs one
            more network pass per image; the batch methods accept a per-call ``tta`` too.

    Example:
        >>> segmenter = LungSegmenter.load()  # doctest: +SKIP
        >>> masks = segmenter.segment_batch([image_a, image_b])  # list of (H, W) bool  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: SegmenterConfig,
        *,
        fast: bool = True,
        batch_size: int = 16,
        metadata: Mapping[str, Any] | None = None,
        tta: TTASpec = None,
    ):
        self.config = config
        self.fast = fast
        self.batch_size = max(1, int(batch_size))
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.tta_views: tuple[TTAView, ...] = resolve_tta(tta, config.tta)
        self.model = model.eval()
        self.bf16 = bool(fast) and bf16_pays()
        if fast:
            self.model = fold_batch_norms(self.model).to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, weights: str | Path | None = None, *, fast: bool = True, batch_size: int = 16, tta: TTASpec = None) -> LungSegmenter:
        """Load weights from a ``.pt`` file or a folder holding ``lung_unet.pt`` (None: the shipped ones).

        Never touches the network: the shipped weights live in ``covidcxr/preprocess/weights/``.
        ``tta``: see the class docstring (None = the weights' ``config.tta``).

        Raises:
            CovidCXRError: naming the file, if it is missing or unusable.
        """
        model, config, metadata = load_model(weights)
        return cls(model, config, fast=fast, batch_size=batch_size, metadata=metadata, tta=tta)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def conventions(self) -> tuple[str, ...]:
        return tuple(self.config.conventions)

    def _channel(self, convention: str | None) -> int:
        convention = convention or self.config.default_convention
        if convention not in self.config.conventions:
            raise CovidCXRError(f"these weights have no {convention!r} output; they have {list(self.config.conventions)}")
        return self.config.conventions.index(convention)

    def forward_prepared(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Network probabilities for prepared inputs: ``(B, S, S)`` or ``(B, 1, S, S)`` -> ``(B, C, S, S)`` float32."""
        tensor = torch.as_tensor(batch, dtype=torch.float32)
        if tensor.ndim == 3:
            tensor = tensor[:, None]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        if self.fast:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast:
            logits = self.model(tensor)
        return torch.sigmoid(logits.float()).contiguous().numpy()

    def _views(self, tta: TTASpec) -> tuple[TTAView, ...]:
        return self.tta_views if tta is None else resolve_tta(tta, self.config.tta)

    def _predict_view(self, images: list[np.ndarray], view: TTAView) -> list[np.ndarray]:
        multiple = int(np.prod(self.config.strides))
        prepared = [prepare_view(image, self.config.input_size, self.config.equalization, view, multiple) for image in images]
        out: list[np.ndarray] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            probabilities = self.forward_prepared(np.stack([x for x, _ in chunk]))
            out.extend(restore_probability(p, placement) for p, (_, placement) in zip(probabilities, chunk))
        return out

    def predict_channels_batch(self, images: Iterable[np.ndarray], tta: TTASpec = None) -> list[np.ndarray]:
        """Probabilities of every output channel at each image's own size: list of ``(C, H, W)`` float32.

        With several TTA views (``tta``, default: the segmenter's), the restored maps of the
        views are averaged; a single view is returned as the network gave it.
        """
        images = list(images)
        views = self._views(tta)
        total = self._predict_view(images, views[0])
        for view in views[1:]:
            for acc, p in zip(total, self._predict_view(images, view)):
                acc += p
        if len(views) > 1:
            total = [acc / np.float32(len(views)) for acc in total]
        return total

    def predict_probability_batch(self, images: Iterable[np.ndarray], convention: str | None = None, tta: TTASpec = None) -> list[np.ndarray]:
        """Lung probability maps, one ``(H, W)`` float32 in [0, 1] per image, at the image's size."""
        channel = self._channel(convention)
        return [p[channel] for p in self.predict_channels_batch(images, tta)]

    def predict_probability(self, image: np.ndarray, convention: str | None = None, tta: TTASpec = None) -> np.ndarray:
        """Lung probability map of one ``(H, W)`` image in [0, 1]: ``(H, W)`` float32 in [0, 1]."""
        return self.predict_probability_batch([image], convention, tta)[0]

    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        convention: str | None = None,
        progress: Callable[[int], None] | None = None,
        tta: TTASpec = None,
    ) -> list[np.ndarray]:
        """Post-processed lung masks, one ``(H, W)`` bool per image, at each image's size.

        Args:
            images: ``(H, W)`` float images in [0, 1], any sizes.
            convention: output channel (`CONVENTIONS`); None = the weights' default
                (``heart_excluded``, the paper's Montgomery/Shenzhen convention).
            progress: called with the number of images finished after each batch.
            tta: test-time augmentation for this call (None: the segmenter's; see `resolve_tta`).
        """
        channel = self._channel(convention)
        masks: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = self.predict_channels_batch(images[start : start + self.batch_size], tta)
            masks.extend(postprocess_mask(p[channel], self.config.threshold) for p in chunk)
            if progress is not None:
                progress(len(chunk))
        return masks

    def segment(self, image: np.ndarray, convention: str | None = None, tta: TTASpec = None) -> np.ndarray:
        """The lung mask of one ``(H, W)`` image in [0, 1]: ``(H, W)`` bool, post-processed."""
        return self.segment_batch([image], convention, tta=tta)[0]


# ---------------------------------------------------------------- metrics and evaluation


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two bool masks (1.0 when both are empty).

    Example:
        >>> a = np.zeros((4, 4), bool); a[:2] = True; b = np.zeros((4, 4), bool); b[1:3] = True
        >>> dice_score(a, b)
        0.5
    """
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def iou_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    union = int((prediction | truth).sum())
    return 1.0 if union == 0 else int((prediction & truth).sum()) / union


def hd95(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels (MONAI ``compute_hausdorff_distance``).

    When exactly one mask is empty the distance is undefined; we return the image
    diagonal (the worst possible value) so a missed segmentation counts, instead of
    silently dropping out of the mean. Both empty: 0.
    """
    import warnings

    from monai.metrics import compute_hausdorff_distance

    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if not prediction.any() and not truth.any():
        return 0.0
    if not prediction.any() or not truth.any():
        return float(math.hypot(*truth.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation chatter about its own internals
        value = compute_hausdorff_distance(
            torch.from_numpy(prediction[None, None]),
            torch.from_numpy(truth[None, None]),
            include_background=True,
            percentile=95,
        )
    return float(value.reshape(-1)[0])


def seen_sha1s(split: Mapping[str, Any] | pd.DataFrame | str | Path) -> set[str]:
    """SHA-1s of the images a model was trained or early-stopped on.

    Args:
        split: weights metadata (``lung_unet.json``, or its parsed dict) whose
            ``split.train_val_sha1`` lists them; or a split manifest (CSV/Parquet path or
            DataFrame) with ``split`` and ``sha1`` columns, whose train/val rows are taken.

    Raises:
        CovidCXRError: the file is missing or holds no split.
    """
    from covidcxr.data.manifest import read_manifest

    if isinstance(split, (str, Path)):
        path = Path(split)
        if not path.is_file():
            raise CovidCXRError(f"split file {path} does not exist")
        if path.suffix == ".json":
            try:
                split = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CovidCXRError(f"split file {path} is not valid JSON: {exc}") from None
        else:
            split = read_manifest(path)
    if isinstance(split, pd.DataFrame):
        if "split" not in split.columns:
            raise CovidCXRError("the split manifest has no 'split' column")
        return {str(s) for s in split.loc[split["split"].isin(["train", "val"]), "sha1"] if isinstance(s, str)}
    entry = split.get("split", split)
    if not isinstance(entry, Mapping) or "train_val_sha1" not in entry:
        raise CovidCXRError("the split metadata has no 'split.train_val_sha1' list (the images the model was fitted on)")
    return {str(s) for s in entry["train_val_sha1"]}


def held_out_rows(manifest: pd.DataFrame, seen: set[str]) -> tuple[pd.DataFrame, int]:
    """Rows whose image the model never saw in training or validation, matched by SHA-1.

    The manifest's ``sha1`` column is used (the SHA-1 of the original file in the shared
    collection), computed from the image file where missing — the same rule as training.

    Returns:
        ``(rows not in seen, number of rows excluded)``.
    """
    from covidcxr.data.manifest import file_sha1, is_missing

    keys = [str(s) if not is_missing(s) else file_sha1(p) for s, p in zip(manifest["sha1"], manifest["image"])]
    keep = np.array([k not in seen for k in keys], dtype=bool)
    return manifest[keep].reset_index(drop=True), int((~keep).sum())


@dataclass
class EvaluationResult:
    """Per-image metrics and their summary (see `evaluate_segmenter`)."""

    per_image: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def _means(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "dice_mean": round(float(frame["dice"].mean()), 4) if len(frame) else None,
        "dice_median": round(float(frame["dice"].median()), 4) if len(frame) else None,
        "iou_mean": round(float(frame["iou"].mean()), 4) if len(frame) else None,
        "hd95_mean": round(float(frame["hd95"].mean()), 2) if len(frame) else None,
        "recall_mean": round(float(frame["recall"].mean()), 4) if len(frame) and "recall" in frame else None,
        "n": int(len(frame)),
    }


def summarize_metrics(per_image: pd.DataFrame, worst: int = 10) -> dict[str, Any]:
    """Overall, per-source and per-annotator means, the ``worst`` images by Dice and, with
    ``recall`` and ``label`` columns, the lung recall per label (`lung_coverage.recall_by_label`)."""
    summary = _means(per_image)
    summary["per_source"] = {str(s): _means(g) for s, g in per_image.groupby("source", sort=True)}
    summary["per_mask_source"] = {str(s): _means(g) for s, g in per_image.groupby("mask_source", sort=True)}
    rows = per_image.sort_values("dice").head(worst)
    summary["worst"] = [
        {"image": r.image, "source": r.source, "mask_source": r.mask_source, "convention": r.convention, "dice": round(r.dice, 4), "iou": round(r.iou, 4), "hd95": round(r.hd95, 2)}
        for r in rows.itertuples()
    ]
    if {"recall", "label"} <= set(per_image.columns):
        from covidcxr.preprocess.lung_coverage import recall_by_label

        summary["recall_by_label"] = recall_by_label(per_image)
    return summary


def evaluate_segmenter(
    segmenter: LungSegmenter,
    manifest: pd.DataFrame,
    *,
    mask_column: str = "mask",
    convention: str = "auto",
    show_progress: bool = True,
    worst: int = 10,
) -> EvaluationResult:
    """Dice, IoU and HD95 of the post-processed masks against a manifest's masks.

    Metrics are computed at each image's own resolution (the manifest's PNGs), after
    `postprocess_mask`, the way `LungSegmenter.segment` returns masks.

    Args:
        segmenter: the model.
        manifest: rows with a mask in ``mask_column`` (others are skipped).
        mask_column: ``"mask"`` or ``"mask_alt"`` (the second annotator).
        convention: ``"auto"`` compares each mask with the output channel of its own
            annotation convention (``<mask_column>_source`` = ``v7labs`` -> ``retrocardiac``,
            anything else -> ``heart_excluded``); or a fixed `CONVENTIONS` entry.
        show_progress: draw a rich progress bar.
        worst: how many of the lowest-Dice images to list.

    Returns:
        `EvaluationResult`: ``per_image`` (image, source, label, patient_id, mask_source,
        convention, dice, iou, hd95, recall — the share of the reference lung the mask
        covers) and ``summary`` (``dice_mean``, ``iou_mean``, ``hd95_mean``,
        ``recall_mean``, ``n``, ``per_source``, ``per_mask_source``, ``worst``,
        ``recall_by_label`` with patient-bootstrap CIs).
    """
    from covidcxr.data.manifest import is_missing
    from covidcxr.io import read_image, read_mask
    from covidcxr.parallel import make_progress
    from covidcxr.preprocess.lung_coverage import lung_recall

    if mask_column not in manifest.columns:
        raise CovidCXRError(f"the manifest has no {mask_column!r} column; nothing to evaluate against")
    rows = manifest[~manifest[mask_column].map(is_missing)].reset_index(drop=True)
    if rows.empty:
        raise CovidCXRError(f"no image in the manifest has a {mask_column!r}; lung segmentation needs reference masks")
    source_column = "mask_source" if mask_column == "mask" else f"{mask_column}_source"
    mask_sources = rows[source_column].map(lambda v: None if is_missing(v) else str(v)) if source_column in rows.columns else pd.Series([None] * len(rows))
    if convention == "auto":
        conventions = [mask_convention(s) for s in mask_sources]
        conventions = [c if c in segmenter.conventions else segmenter.config.default_convention for c in conventions]
    else:
        segmenter._channel(convention)
        conventions = [convention] * len(rows)
    channels = [segmenter.conventions.index(c) for c in conventions]

    records: list[dict[str, Any]] = []
    with make_progress(transient=True) as progress:
        task = progress.add_task("segmenting + scoring", total=len(rows), visible=show_progress)
        for start in range(0, len(rows), segmenter.batch_size):
            stop = min(start + segmenter.batch_size, len(rows))
            images = [read_image(rows.at[i, "image"]).pixels for i in range(start, stop)]
            probabilities = segmenter.predict_channels_batch(images)
            for offset, (image, prob) in enumerate(zip(images, probabilities)):
                i = start + offset
                truth = read_mask(rows.at[i, mask_column], image.shape)
                predicted = postprocess_mask(prob[channels[i]], segmenter.threshold)
                records.append(
                    {
                        "image": rows.at[i, "image"],
                        "source": rows.at[i, "source"],
                        "label": str(rows.at[i, "label"]) if "label" in rows.columns and not is_missing(rows.at[i, "label"]) else "unknown",
                        "patient_id": rows.at[i, "patient_id"] if "patient_id" in rows.columns else None,
                        "mask_source": mask_sources.iloc[i] or "unspecified",
                        "convention": conventions[i],
                        "dice": dice_score(predicted, truth),
                        "iou": iou_score(predicted, truth),
                        "hd95": hd95(predicted, truth),
                        "recall": lung_recall(predicted, truth),
                    }
                )
            progress.advance(task, stop - start)
    per_image = pd.DataFrame.from_records(records)
    summary = summarize_metrics(per_image, worst=worst)
    summary["convention"] = convention
    summary["mask_column"] = mask_column
    summary["tta"] = tta_name(segmenter.tta_views)
    return EvaluationResult(per_image, summary)


__all__ = [
    "CONVENTIONS",
    "DEFAULT_WEIGHTS",
    "HEART_EXCLUDED",
    "RETROCARDIAC",
    "WEIGHTS_DIR",
    "EvaluationResult",
    "LungSegmenter",
    "DEFAULT_TTA_PRESET",
    "TTA_PRESETS",
    "Placement",
    "SegmenterConfig",
    "TTAView",
    "bf16_pays",
    "build_unet",
    "dice_score",
    "evaluate_segmenter",
    "hd95",
    "held_out_rows",
    "iou_score",
    "load_model",
    "mask_convention",
    "placement_for",
    "postprocess_mask",
    "keep_largest_components",
    "fill_holes",
    "fold_batch_norms",
    "prepare_image",
    "prepare_mask",
    "prepare_view",
    "resolve_tta",
    "read_metadata",
    "resolve_weights",
    "restore_probability",
    "save_weights",
    "seen_sha1s",
    "soften_mask",
    "summarize_metrics",
    "tta_name",
]
