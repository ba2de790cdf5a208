"""Intensity harmonisation: histogram equalisation, CLAHE, [0, 1] normalisation, JPEG re-encoding.

Why: radiographic contrast depends on the scanner, its calibration and the VOI transform
applied at export, so raw intensity ranges differ by site — a bias a network can learn.
"Histogram equalization is a simple mean to guarantee quite uniform image dynamic in the
data" (Tartaglione et al. 2020, §3.2). Hall et al. (2020) re-encoded every image as JPEG
at quality 90 so that compression sharpness could not tell the classes apart (their COVID
images were JPEGs from papers, the others were not).

All functions take and return ``(H, W)`` float32 images in [0, 1].
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image
from skimage import exposure

Equalization = Literal["none", "histogram", "clahe"]


def _check(image: np.ndarray, name: str) -> np.ndarray:
    if image.ndim != 2:
        raise ValueError(f"{name} expects a 2-D (H, W) image, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def normalize_intensity(image: np.ndarray, low_percentile: float = 0.0, high_percentile: float = 100.0) -> np.ndarray:
    """Stretch an image linearly so the given percentiles map to 0 and 1 (clipped).

    Args:
        image: ``(H, W)`` array of any range.
        low_percentile: percentile mapped to 0 (0 = the minimum).
        high_percentile: percentile mapped to 1 (100 = the maximum).

    Returns:
        ``(H, W)`` float32 in [0, 1]; a constant image becomes all zeros.

    Example:
        >>> normalize_intensity(np.array([[2.0, 4.0], [6.0, 10.0]])).tolist()
        [[0.0, 0.25], [0.5, 1.0]]
    """
    image = _check(np.asarray(image), "normalize_intensity")
    low, high = np.percentile(image, [low_percentile, high_percentile])
    if high - low <= 1e-12:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def equalize_histogram(image: np.ndarray, mask: np.ndarray | None = None, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation (the paper's choice): scikit-image's ``equalize_hist``, computed faster.

    Every image is equalised three times on the way to a prediction (the working image, the
    screening sample, the U-Net's input), so this is on the latency path of issue 13. The
    result is scikit-image's to float32 rounding (``tests/preprocess/test_equalize.py``
    checks ≤ 1e-6 against ``skimage.exposure.equalize_hist``): the same histogram
    (``np.histogram`` over the image's range) and cumulative distribution, but its linear
    interpolation between bin centres done by index arithmetic on uniform bins instead of
    ``np.interp``'s binary search in float64 — ~4x faster on a 256-px image. With a ``mask``
    scikit-image is called as it is.

    Args:
        image: ``(H, W)`` float image in [0, 1].
        mask: optional ``(H, W)`` bool; only these pixels define the histogram (e.g. the
            body, so the black background does not dominate), the mapping applies to all.
        bins: histogram bins.

    Returns:
        ``(H, W)`` float32 in [0, 1] with a near-uniform histogram.

    Example:
        >>> out = equalize_histogram(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8) ** 3)
        >>> round(float(np.median(out)), 2)
        0.5
    """
    image = _check(image, "equalize_histogram")
    low, high = image.min(), image.max()
    if float(high) - float(low) <= 1e-12:
        return np.zeros_like(image, dtype=np.float32)
    if mask is not None:
        return exposure.equalize_hist(image, nbins=bins, mask=mask).astype(np.float32)
    # As skimage.exposure.cumulative_distribution: counts over [min, max], normalised cumsum (float32).
    counts, edges = np.histogram(image, bins=bins, range=(low, high))
    cdf = (counts.cumsum() / float(counts.sum())).astype(np.float32).astype(np.float64)
    centres = ((edges[:-1] + edges[1:]) / 2.0).astype(np.float64)
    # np.interp(image, centres, cdf): find each value's interval [centres[k], centres[k+1]) from
    # the (nearly) uniform spacing, then correct it by one against the true centres.
    values = image.astype(np.float64)
    index = (values - centres[0]) * ((bins - 1) / (centres[-1] - centres[0]))
    np.clip(index, 0, bins - 2, out=index)
    index = index.astype(np.intp)
    index -= values < centres[index]
    np.clip(index, 0, bins - 2, out=index)
    index += (values >= centres[index + 1]) & (index < bins - 2)
    # ... and np.interp's formula on it: slope * (x - x_k) + y_k; beyond the first/last centre, cdf[0] / cdf[-1].
    slope = np.diff(cdf) / np.diff(centres)
    out = slope[index] * (values - centres[index]) + cdf[index]
    out = np.where(values <= centres[0], cdf[0], np.where(values >= centres[-1], cdf[-1], out))
    return out.astype(np.float32)


def equalize_clahe(image: np.ndarray, clip_limit: float = 0.01, tile_fraction: float = 1 / 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (CLAHE), via scikit-image.

    Args:
        image: ``(H, W)`` float image in [0, 1].
        clip_limit: scikit-image's normalised clip limit (higher = more contrast).
        tile_fraction: tile side as a fraction of the image side (1/8 = an 8×8 grid).

    Returns:
        ``(H, W)`` float32 in [0, 1].
    """
    image = _check(image, "equalize_clahe")
    kernel = max(8, int(round(min(image.shape) * tile_fraction)))
    return exposure.equalize_adapthist(np.clip(image, 0.0, 1.0), kernel_size=kernel, clip_limit=clip_limit).astype(np.float32)


def equalize(image: np.ndarray, method: Equalization = "histogram") -> np.ndarray:
    """Apply the named equalisation: ``"histogram"``, ``"clahe"`` or ``"none"`` (min-max only)."""
    if method == "histogram":
        return equalize_histogram(image)
    if method == "clahe":
        return equalize_clahe(image)
    if method == "none":
        return normalize_intensity(image)
    raise ValueError(f"unknown equalization {method!r}; expected 'histogram', 'clahe' or 'none'")


def harmonize_jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """Re-encode as 8-bit JPEG at ``quality`` and decode again (Hall et al. 2020: quality 90).

    Every image then carries the same compression artefacts, whatever its original format.

    Returns:
        ``(H, W)`` float32 in [0, 1].
    """
    image = _check(image, "harmonize_jpeg")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1-100, got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"), dtype=np.float32) / 255.0
