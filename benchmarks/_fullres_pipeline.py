"""The preprocessing and predict path as issue 13 measured them, for before/after benchmarks only.

`covidcxr.preprocess.pipeline` now downscales every image to its working resolution before
equalising and segmenting it (PIPELINE_VERSION 3), and the steps around the networks were
made faster without changing their results. To time the old path *in the same process*
(the machine is shared, so only interleaved figures compare), this module rebuilds it from
the library's own steps and the old implementations:

* the old `preprocess_batch` — read at full resolution, equalise the full image, segment it
  at its own size (the U-Net restores and post-processes its probability map at full
  resolution), then the same crop/resize/mask (`pipeline._finish`);
* the old U-Net fast path (bf16 autocast whatever the CPU, BatchNorms not folded:
  `unfolded_segmenter`);
* scikit-image's ``equalize_hist`` (np.interp), MONAI's ``KeepLargestConnectedComponent`` +
  SciPy's ``binary_fill_holes``, the opacity-cut check through ``regionprops`` (which
  computed the convex hull too), overlays enlarged to 256 px before PNG encoding.

`installed()` swaps them in for the duration of a ``with`` block; nothing in ``src/`` uses
this module.

Example:
    >>> with installed([segmenter]):                       # doctest: +SKIP
    ...     predictor.predict_file("cxr.png")              # the pre-change latency
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from covidcxr.errors import CovidCXRError
from covidcxr.io import read_image, read_mask
from covidcxr.preprocess import cache as cache_module
from covidcxr.preprocess import pipeline
from covidcxr.preprocess.equalize import equalize, harmonize_jpeg

OLD_PIPELINE_VERSION = 2


def old_equalize_histogram(image, mask=None, bins: int = 256):
    """`covidcxr.preprocess.equalize.equalize_histogram` before: scikit-image's ``equalize_hist`` itself."""
    from skimage import exposure

    image = np.asarray(image, dtype=np.float32)
    if float(image.max()) - float(image.min()) <= 1e-12:
        return np.zeros_like(image, dtype=np.float32)
    return exposure.equalize_hist(image, nbins=bins, mask=mask).astype(np.float32)


def old_postprocess_mask(probability_or_mask, threshold: float = 0.5):
    """`covidcxr.preprocess.lungs.postprocess_mask` before: MONAI's component filter + SciPy's hole filling."""
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    array = np.asarray(probability_or_mask)
    mask = array.astype(bool) if array.dtype == bool else array > threshold
    if not mask.any():
        return mask
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, independent=False, num_components=2)
    kept = np.asarray(keep(mask[None].astype(np.uint8)))[0].astype(bool)
    return ndimage.binary_fill_holes(kept)


def old_lung_height_ratio(mask) -> float:
    """The opacity-cut check's ratio before: through ``regionprops``, whose solidity (convex hull) was computed too."""
    from skimage.measure import label, regionprops

    regions = sorted(regionprops(label(np.asarray(mask, bool), connectivity=2)), key=lambda r: r.area, reverse=True)[:2]
    if len(regions) < 2:
        return float("nan")
    heights = [r.bbox[2] - r.bbox[0] for r in regions]
    _ = min(float(r.solidity) for r in regions)
    return round(min(heights) / max(heights), 4)


def old_encode(rgb) -> bytes:
    """`covidcxr.serve.overlays._encode` before: enlarged to 256 px (nearest) before PNG encoding."""
    import io

    from PIL import Image

    pixels = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    height, width = pixels.shape[:2]
    factor = 256 // max(height, width)
    if factor > 1:
        image = image.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def unfolded_segmenter(weights=None):
    """The lung U-Net's fast path before: channels-last, BatchNorms not folded (`installed` adds bf16 autocast)."""
    import torch

    from covidcxr.preprocess.lungs import LungSegmenter

    segmenter = LungSegmenter.load(weights, fast=False)
    segmenter.model = segmenter.model.to(memory_format=torch.channels_last)
    segmenter.fast = True
    return segmenter


def preprocess_batch_full_resolution(items: Sequence, config, segmenter=None, screen: bool = False) -> list:
    """`covidcxr.preprocess.pipeline.preprocess_batch` as of PIPELINE_VERSION 2 (no downscale)."""
    from covidcxr.io.image import DEFAULT_MAX_PIXELS
    from covidcxr.preprocess.screening import inspect_input, screen_pixels

    results: list = [None] * len(items)
    prepared = []
    for position, (path, manifest_mask) in enumerate(items):
        try:
            origin = pipeline.mask_origin(config, manifest_mask)
            if screen and not isinstance(path, np.ndarray):
                inspect_input(path, DEFAULT_MAX_PIXELS)
            pixels = pipeline.pixels_from_array(path) if isinstance(path, np.ndarray) else read_image(path).pixels
            if config.jpeg_quality is not None:
                pixels = harmonize_jpeg(pixels, config.jpeg_quality)
            equalized = equalize(pixels, config.equalization)
            if screen:
                screen_pixels(equalized)
            mask = None
            if origin == "manifest":
                mask = np.asarray(manifest_mask, bool) if isinstance(manifest_mask, np.ndarray) else read_mask(manifest_mask, shape=equalized.shape)
            prepared.append((position, equalized, mask, origin))
        except CovidCXRError as exc:
            results[position] = exc
    need = [entry for entry in prepared if entry[2] is None]
    segmented = {}
    if need:
        model = segmenter if segmenter is not None else pipeline.load_segmenter(config.segmenter_weights)
        masks = model.segment_batch([entry[1] for entry in need])
        segmented = {entry[0]: np.asarray(m, dtype=bool) for entry, m in zip(need, masks)}
    for position, equalized, mask, origin in prepared:
        mask = segmented[position] if mask is None else mask
        results[position] = pipeline._finish(equalized, mask, config, origin, tuple(equalized.shape))
    return results


@contextlib.contextmanager
def installed(segmenters: Sequence = ()) -> Iterator[None]:
    """Within the block: the old predict path (module docstring), PIPELINE_VERSION 2 cache keys, bf16 autocast on ``segmenters``."""
    from covidcxr.preprocess import equalize as equalize_module
    from covidcxr.preprocess import lung_coverage, lungs
    from covidcxr.serve import overlays

    swaps = [
        (pipeline, "preprocess_batch", preprocess_batch_full_resolution),
        (cache_module, "preprocess_batch", preprocess_batch_full_resolution),
        (pipeline, "PIPELINE_VERSION", OLD_PIPELINE_VERSION),
        (lungs, "bf16_pays", lambda: True),  # segmenters loaded inside the block (cache workers) take the old path too
        (equalize_module, "equalize_histogram", old_equalize_histogram),
        (lungs, "equalize_histogram", old_equalize_histogram),
        (lungs, "postprocess_mask", old_postprocess_mask),
        (lung_coverage, "lung_height_ratio", old_lung_height_ratio),
        (overlays, "_encode", old_encode),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    flags = [(s, getattr(s, "bf16", None)) for s in segmenters]
    for module, name, value in swaps:
        setattr(module, name, value)
    for segmenter, _ in flags:
        segmenter.bf16 = bool(segmenter.fast)  # the old fast path: bf16 autocast on every CPU
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for segmenter, flag in flags:
            segmenter.bf16 = flag
