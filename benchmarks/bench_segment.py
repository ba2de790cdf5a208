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


def _median_ms(run, repeats: int = 5) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 1)


def bench_unet_share_of_predict(context) -> dict:
    """The U-Net in predict's path and in training: per-image latency, its share of preprocessing, s per training step.

    * ``unet_ms`` (1 image, as predict calls it): the network alone at 256 px, and
      `LungSegmenter.segment` end to end on a 320-px and a 1024-px image;
    * ``preprocess_ms``: `preprocess_batch` of the same images with the U-Net (predict's
      preprocessing, mask_source=model) vs with a given mask (no U-Net): the difference is
      the U-Net's cost inside predict, and its share of that step;
    * ``train``: seconds per optimisation step (batch 8, 256 px, bf16, augmentation with
      pasted opacities and site transforms), on 1 and 2 threads, and the wall time of the
      shipped recipe (50 epochs x 31 steps) extrapolated from it;
    * the 1-minute load average before and after (the 2 cores are shared).
    """
    import os

    import torch

    from covidcxr.data.synth import synthesize
    from covidcxr.data.sources import load_source
    from covidcxr.io import read_image
    from covidcxr.preprocess.lung_training import LungSegmentationModule, build_augmentation, make_loss
    from covidcxr.preprocess.lungs import LungSegmenter, prepare_image
    from covidcxr.preprocess.pipeline import PreprocessConfig, preprocess_batch

    load_before = round(os.getloadavg()[0], 2)
    segmenter = LungSegmenter.load(batch_size=1)
    folder = context.scratch / "unet_phantoms"
    synthesize(folder, n_images=2, size=1024, seed=0)
    manifest = load_source(folder).manifest
    big = str(manifest["image"].iloc[0])
    small_path = context.scratch / "unet_320.png"
    from PIL import Image

    with Image.open(big) as image:
        image.convert("L").resize((320, 320)).save(small_path)
    figures: dict = {"threads_predict": 1, "input_px": segmenter.input_size, "unet_ms": {}, "preprocess_ms": {}}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepared = prepare_image(read_image(big).pixels, segmenter.input_size)[0][None]
        figures["unet_ms"]["network_256"] = _median_ms(lambda: segmenter.forward_prepared(prepared))
        config = PreprocessConfig(lungs="mask", size=224, mask_source="model")
        for name, path in (("320px", str(small_path)), ("1024px", big)):
            pixels = read_image(path).pixels
            figures["unet_ms"][f"segment_{name}"] = _median_ms(lambda: segmenter.segment(pixels))
            mask = str(context.scratch / f"mask_{name}.png")
            Image.fromarray((segmenter.segment(pixels) * 255).astype(np.uint8)).save(mask)
            with_unet = _median_ms(lambda: preprocess_batch([(path, None)], config, segmenter))
            given = _median_ms(lambda: preprocess_batch([(path, mask)], PreprocessConfig(lungs="mask", size=224, mask_source="manifest"), segmenter))
            figures["preprocess_ms"][name] = {
                "with_unet": with_unet,
                "mask_given": given,
                "unet_share_of_preprocess": round(max(0.0, with_unet - given) / with_unet, 3),
            }
        figures["network_images_per_s_1thread_batch1"] = round(1000 / figures["unet_ms"]["network_256"], 1)

        module = LungSegmentationModule(segmenter.config.to_dict(), loss="tversky_ce")
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        augment = build_augmentation(256, seed=0, opacity_prob=0.5, site_prob=0.2)
        lungs = torch.zeros((2, 256, 256))
        lungs[:, 40:220, 30:120] = lungs[:, 40:220, 140:230] = 1

        def step() -> None:
            batch = [augment({"image": torch.from_numpy(prepared), "label": lungs}) for _ in range(8)]
            images = torch.stack([torch.as_tensor(b["image"]).float() for b in batch])
            labels = torch.stack([torch.as_tensor(b["label"]).float() for b in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = make_loss("tversky_ce")(module(images).float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        module.train()
        figures["train"] = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seconds = _median_ms(step, repeats=3) / 1000
            figures["train"][f"{threads}thread"] = {"s_per_step_batch8": round(seconds, 2), "minutes_50_epochs_x_31_steps": round(seconds * 50 * 31 / 60, 1)}
    finally:
        torch.set_num_threads(previous)
    figures["load_average_1min"] = [load_before, round(os.getloadavg()[0], 2)]
    return figures


BENCHMARKS = [bench_segment_256, bench_unet_share_of_predict]
