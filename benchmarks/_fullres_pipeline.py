"""The preprocessing as it was before "downscale first" (PIPELINE_VERSION 2), for before/after benchmarks only.

`covidcxr.preprocess.pipeline` now downscales every image to its working resolution before
equalising and segmenting it. To time the old order *in the same process* (the machine is
shared, so only interleaved figures compare), this module rebuilds the old
`preprocess_batch` from the library's own steps — read at full resolution, equalise the
full image, segment it at its own size (the U-Net restores and post-processes its
probability map at full resolution), then the same crop/resize/mask (`pipeline._finish`) —
and the old U-Net fast path (bf16 autocast, whatever the CPU). `installed()` swaps them in
for the duration of a ``with`` block; nothing in ``src/`` uses this module.

Example:
    >>> with installed():                                  # doctest: +SKIP
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
    """Within the block: the full-resolution pipeline, PIPELINE_VERSION 2 cache keys, and bf16 autocast on ``segmenters``."""
    from covidcxr.preprocess import lungs

    saved = (pipeline.preprocess_batch, cache_module.preprocess_batch, pipeline.PIPELINE_VERSION, lungs.bf16_pays)
    flags = [(s, getattr(s, "bf16", None)) for s in segmenters]
    pipeline.preprocess_batch = cache_module.preprocess_batch = preprocess_batch_full_resolution
    pipeline.PIPELINE_VERSION = OLD_PIPELINE_VERSION
    lungs.bf16_pays = lambda: True  # segmenters loaded inside the block (cache workers) take the old path too
    for segmenter, _ in flags:
        segmenter.bf16 = bool(segmenter.fast)  # the old fast path: bf16 autocast on every CPU
    try:
        yield
    finally:
        pipeline.preprocess_batch, cache_module.preprocess_batch, pipeline.PIPELINE_VERSION, lungs.bf16_pays = saved
        for segmenter, flag in flags:
            segmenter.bf16 = flag
