"""Lung segmentation throughput at 256 px: our batched bf16 + channels-last path vs a plain fp32 loop.

Both paths run the same weights on the same phantom images in the same process:

* ``optimized``: `LungSegmenter(fast=True, batch_size=16)` — bf16 autocast and
  channels-last tensors (oneDNN/AMX kernels on this CPU), 16 images per forward pass;
* ``plain``: the same network in float32, one image at a time (`LungSegmenter(fast=False,
  batch_size=1)`), i.e. the loop one would write first;
* ``fp32_batched``: float32, batched — separates the gain of batching from that of bf16;
* ``tta``: the optimised path with test-time augmentation (`LungSegmenter(tta=...)`, the
  ``"multiscale"`` preset: long side 256 and 272 px, two network passes per image, maps
  averaged) — its end-to-end images/s, its cost relative to ``optimized``, and the mean
  Dice between its masks and the plain-path masks of the optimised segmenter.

Figures are given for the network alone (prepared 256 x 256 inputs) and end to end
(`segment_batch`: resize + equalise + U-Net + restore + post-process), with the mean Dice
between the optimised and the plain masks (bf16 must not change the segmentation).
Each timing is the best of ``REPEATS`` runs (the machine's 2 cores are shared).
"""

from __future__ import annotations

import time

import numpy as np

IMAGES = 32
REPEATS = 3


def _best_rate(count: int, run) -> float:
    run()  # warm-up: oneDNN picks and caches its kernels on the first call
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return round(count / best, 1)


def bench_segment_256(context) -> dict:
    """Images/s of lung segmentation at 256 px, optimised vs plain, and their agreement."""
    import torch

    from covidcxr.data.sources import load_source
    from covidcxr.data.synth import synthesize
    from covidcxr.io import read_image
    from covidcxr.preprocess.lungs import (
        DEFAULT_TTA_PRESET,
        DEFAULT_WEIGHTS,
        TTA_PRESETS,
        LungSegmenter,
        SegmenterConfig,
        build_unet,
        dice_score,
        load_model,
        prepare_image,
    )

    if DEFAULT_WEIGHTS.is_file():
        model, config, _ = load_model()
        weights = "shipped"
    else:  # speed does not depend on the weights' values
        config = SegmenterConfig()
        model = build_unet(config).eval()
        weights = "random init (shipped weights absent)"
    folder = context.scratch / "segment_phantoms"
    synthesize(folder, n_images=IMAGES, size=256, seed=0)
    images = [read_image(p).pixels for p in load_source(folder).manifest["image"]]

    optimized = LungSegmenter(model, config, fast=True, batch_size=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_model = build_unet(config)
    plain_model.load_state_dict(state)
    plain = LungSegmenter(plain_model, config, fast=False, batch_size=1)
    fp32_batched = LungSegmenter(plain_model, config, fast=False, batch_size=16)
    tta = LungSegmenter(model, config, fast=True, batch_size=16, tta=DEFAULT_TTA_PRESET)

    prepared = np.stack([prepare_image(image, config.input_size)[0] for image in images])
    network = {
        "optimized": _best_rate(IMAGES, lambda: [optimized.forward_prepared(prepared[i : i + 16]) for i in range(0, IMAGES, 16)]),
        "plain": _best_rate(IMAGES, lambda: [plain.forward_prepared(prepared[i : i + 1]) for i in range(IMAGES)]),
        "fp32_batched": _best_rate(IMAGES, lambda: [fp32_batched.forward_prepared(prepared[i : i + 16]) for i in range(0, IMAGES, 16)]),
    }
    end_to_end = {
        "optimized": _best_rate(IMAGES, lambda: optimized.segment_batch(images)),
        "plain": _best_rate(IMAGES, lambda: [plain.segment(image) for image in images]),
        "fp32_batched": _best_rate(IMAGES, lambda: fp32_batched.segment_batch(images)),
        "tta": _best_rate(IMAGES, lambda: tta.segment_batch(images)),
    }
    fast_masks = optimized.segment_batch(images)
    tta_masks = tta.segment_batch(images)
    plain_masks = [plain.segment(image) for image in images]
    agreement = float(np.mean([dice_score(a, b) for a, b in zip(fast_masks, plain_masks)]))
    return {
        "weights": weights,
        "input_px": config.input_size,
        "images": IMAGES,
        "threads": torch.get_num_threads(),
        "network_images_per_s_optimized_bf16_cl_batch16": network["optimized"],
        "network_images_per_s_plain_fp32_loop": network["plain"],
        "network_images_per_s_fp32_batch16": network["fp32_batched"],
        "network_speedup": round(network["optimized"] / network["plain"], 2),
        "end_to_end_images_per_s_optimized": end_to_end["optimized"],
        "end_to_end_images_per_s_plain_fp32_loop": end_to_end["plain"],
        "end_to_end_images_per_s_fp32_batch16": end_to_end["fp32_batched"],
        "end_to_end_speedup": round(end_to_end["optimized"] / end_to_end["plain"], 2),
        "mask_dice_optimized_vs_plain": round(agreement, 4),
        "tta_preset": DEFAULT_TTA_PRESET,
        "tta_views": len(TTA_PRESETS[DEFAULT_TTA_PRESET]),
        "end_to_end_images_per_s_tta": end_to_end["tta"],
        "tta_cost_vs_optimized": round(end_to_end["optimized"] / end_to_end["tta"], 2),
        "mask_dice_tta_vs_optimized": round(float(np.mean([dice_score(a, b) for a, b in zip(tta_masks, fast_masks)])), 4),
    }


BENCHMARKS = [bench_segment_256]
