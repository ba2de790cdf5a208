"""Preprocessing figures: full pipeline images/s into an empty cache (cold) and from it (warm).

Cold = read → equalise → lung mask (manifest mask or the U-Net) → mask → resize → write
the float16 entry, on all cores; warm = the same call again, where every image is a cache
hit (hash the file, find the entry, read its metadata). The ratio is what the cache buys
every training run after the first.
"""

from __future__ import annotations

import time


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def _sample(context, count: int, with_masks: bool):
    if context.shared_collection is not None:
        from covidcxr.data.sources import load_source

        manifest = load_source(context.shared_collection).manifest
        origin = "shared collection (320 px PNG)"
    else:
        from covidcxr.data.synth import synthesize

        manifest = synthesize(context.scratch / "pp_phantoms", n_images=count, size=256, seed=0)
        origin = "phantoms (256 px PNG)"
    if with_masks:
        manifest = manifest[manifest["mask"].notna()]
    # A fixed, source-mixed sample: every k-th row.
    step = max(1, len(manifest) // count)
    return manifest.iloc[::step].head(count).reset_index(drop=True), origin


def _cold_warm(manifest, config, cache_dir) -> dict:
    from covidcxr.parallel import default_workers
    from covidcxr.preprocess.cache import preprocess_collection

    start = time.perf_counter()
    cold = preprocess_collection(manifest, config, cache_dir, workers=default_workers(), progress=False)
    cold_seconds = time.perf_counter() - start
    start = time.perf_counter()
    warm = preprocess_collection(manifest, config, cache_dir, workers=default_workers(), progress=False)
    warm_seconds = time.perf_counter() - start
    assert warm.hits == cold.misses, (warm.hits, cold.misses)
    return {
        "images": len(manifest),
        "workers": default_workers(),
        "rejected": len(cold.rejected),
        "cold_images_per_s": _rate(len(manifest), cold_seconds),
        "warm_images_per_s": _rate(len(manifest), warm_seconds),
        "warm_speedup": round(cold_seconds / warm_seconds, 1) if warm_seconds > 0 else float("inf"),
    }


def bench_preprocess_cache(context) -> dict:
    """Cold vs warm cache, lungs="mask" at 224 px, with manifest masks and with the U-Net."""
    from covidcxr.preprocess.pipeline import PreprocessConfig, SegmenterUnavailable, load_segmenter

    figures: dict = {}
    manifest, origin = _sample(context, 300, with_masks=True)
    figures["data"] = origin
    figures["mask_source_manifest"] = _cold_warm(manifest, PreprocessConfig(mask_source="manifest"), context.scratch / "pp_manifest")
    weights = None
    try:
        load_segmenter(None)  # only to learn whether the shipped weights load
        weights_note = "shipped weights"
    except SegmenterUnavailable as exc:
        # The U-Net's speed does not depend on its weights' values: time an untrained
        # network of the default architecture, and say so.
        try:
            from covidcxr.preprocess import lungs
        except ImportError:
            figures["mask_source_model"] = {"skipped": f"the lung segmenter cannot be loaded: {exc}"}
            return figures
        config = lungs.SegmenterConfig()
        weights = str(lungs.save_weights(lungs.build_unet(config), config, context.scratch / "untrained_unet.pt"))
        weights_note = "untrained default architecture (shipped weights absent): throughput only, masks meaningless"
    manifest, _ = _sample(context, 200, with_masks=False)
    config = PreprocessConfig(mask_source="model", segmenter_weights=weights)
    figures["mask_source_model"] = {"weights": weights_note, **_cold_warm(manifest, config, context.scratch / "pp_model")}
    return figures


BENCHMARKS = [bench_preprocess_cache]


def bench_downscale_first_masks(context) -> dict:
    """Lung masks before vs after "downscale first", and bf16 vs float32, on the shared collection's reference masks.

    The images with heart-excluded reference masks (the convention the pipeline uses: NLM
    Montgomery/Shenzhen and General Blockchain's Cohen masks). Before = the U-Net on the
    equalised full image, mask at the image's size (float32, and bf16 autocast as the old fast
    path ran it); after = on the area-downscaled working image (`working_shape`, 224-px
    model input), the mask brought back to the image's size by nearest neighbour. Dice
    against the reference masks, and between the pipelines' masks.
    """
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent (../shared/data/cxr)"}
    import numpy as np
    import pandas as pd
    import torch

    from covidcxr.io import read_image, read_mask
    from covidcxr.preprocess.equalize import equalize
    from covidcxr.preprocess.geometry import _resize_mask
    from covidcxr.preprocess.lungs import LungSegmenter, dice_score
    from covidcxr.preprocess.pipeline import PreprocessConfig, downscale, working_shape

    root = context.shared_collection
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    manifest = manifest[(manifest["mask"] != "") & (manifest["mask_source"] != "v7labs")]
    segmenter = LungSegmenter.load(None)
    config = PreprocessConfig(size=224)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for image_path, mask_path, source in zip(manifest["image"], manifest["mask"], manifest["source"]):
            raw = read_image(root / image_path).pixels
            truth = read_mask(root / mask_path, raw.shape)
            full = equalize(raw, "histogram")
            segmenter.bf16 = False
            before = segmenter.segment(full)
            segmenter.bf16 = True
            before_bf16 = segmenter.segment(full)
            segmenter.bf16 = False
            after = _resize_mask(segmenter.segment(equalize(downscale(raw, working_shape(raw.shape, config)), "histogram")), raw.shape)
            rows.append(
                {
                    "source": source,
                    "dice_before_fp32": dice_score(before, truth),
                    "dice_before_bf16": dice_score(before_bf16, truth),
                    "dice_after_fp32": dice_score(after, truth),
                    "agreement_after_vs_before": dice_score(after, before),
                    "agreement_bf16_vs_fp32": dice_score(before_bf16, before),
                }
            )
    finally:
        torch.set_num_threads(threads)
    frame = pd.DataFrame(rows)
    numbers = frame.drop(columns="source")
    return {
        "images": len(frame),
        "per_source_images": frame["source"].value_counts().to_dict(),
        "mean": numbers.mean().round(4).to_dict(),
        "min": numbers.min().round(4).to_dict(),
        "dice_change_after_minus_before": round(float(numbers["dice_after_fp32"].mean() - numbers["dice_before_fp32"].mean()), 4),
        "per_source_mean_dice_after": frame.groupby("source")["dice_after_fp32"].mean().round(4).to_dict(),
        "per_source_mean_dice_before": frame.groupby("source")["dice_before_fp32"].mean().round(4).to_dict(),
    }


BENCHMARKS.append(bench_downscale_first_masks)
