"""The pictures a person checks a prediction with: model input, lung mask, Grad-CAM, as PNG.

All three are drawn in the model input's geometry and at its resolution (what the network
saw, after equalisation, lung masking/cropping and padding): one PNG pixel per input
pixel. The page enlarges them to one width with ``image-rendering: pixelated`` (whole
pixels, no smoothing); enlarging here instead made PNG encoding the costliest step after
the U-Net (a 128-px input drawn at 256 px: 4x the pixels to compress on every request).

The colour map is a hand-written five-stop "inferno"-like ramp (black - purple - red -
orange - pale yellow): a perceptually ordered map in a few lines of NumPy, so the service
does not need matplotlib.

Example:
    >>> image = np.random.rand(64, 64).astype(np.float32)
    >>> png = gradcam_overlay(image, np.random.rand(64, 64))
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["input_png", "lung_mask_overlay", "gradcam_overlay", "heat_colours"]

_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
_LUNG_TINT = np.array([40, 200, 90], dtype=np.float64)
_LUNG_EDGE = np.array([90, 255, 140], dtype=np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` values in [0, 1] -> ``(H, W, 3)`` float RGB on a 0-255 scale (the ramp above)."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    return np.stack([np.interp(values, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    grey = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0.0, 1.0) * 255.0
    return np.repeat(grey[..., None], 3, axis=-1)


def _encode(rgb: np.ndarray) -> bytes:
    pixels = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # fast: up to 3 PNGs per request
    return buffer.getvalue()


def input_png(image: np.ndarray) -> bytes:
    """The model input ``(H, W)`` in [0, 1] as a grey PNG."""
    return _encode(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255.0)


def lung_mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.35) -> bytes:
    """The model input with the lung mask tinted green and its outline drawn, as PNG.

    Args:
        image: ``(H, W)`` model input in [0, 1].
        mask: ``(H, W)`` bool lung mask in the same geometry.
        alpha: tint strength inside the lungs.
    """
    mask = np.asarray(mask, dtype=bool)
    rgb = _grey_rgb(image)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * _LUNG_TINT
    edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
    rgb[edge] = _LUNG_EDGE
    return _encode(rgb)


def gradcam_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> bytes:
    """The model input with the Grad-CAM map blended in (weight ``alpha * saliency``), as PNG.

    Args:
        image: ``(H, W)`` model input in [0, 1].
        saliency: ``(H, W)`` map in [0, 1] (`covidcxr.audit.saliency.gradcam`).
        alpha: blend weight where the map is 1; where it is 0 the image shows unchanged.
    """
    saliency = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float64)), 0.0, 1.0)
    weight = (alpha * saliency)[..., None]
    return _encode((1 - weight) * _grey_rgb(image) + weight * heat_colours(saliency))
