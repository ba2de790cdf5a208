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
