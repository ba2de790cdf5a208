"""Data-stage figures: decoding, fingerprinting (near-duplicates), phantom synthesis, splitting."""

from __future__ import annotations

import time

import numpy as np


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench_read_images(context) -> dict:
    """Decode throughput of `covidcxr.io.read_image` on PNG (real collection) and DICOM (generated)."""
    from covidcxr.io import read_image, write_dicom

    figures: dict = {}
    if context.shared_collection is not None:
        from covidcxr.data.sources import load_source

        paths = load_source(context.shared_collection).manifest["image"].tolist()[:400]
        start = time.perf_counter()
        for path in paths:
            read_image(path)
        figures["png_320px_images_per_s"] = _rate(len(paths), time.perf_counter() - start)
    folder = context.scratch / "dicom"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(50):
        path = write_dicom(
            folder / f"{index}.dcm",
            rng.integers(0, 4096, (2048, 2048), dtype=np.uint16),
            "MONOCHROME1",
            12,
            WindowCenter=2048,
            WindowWidth=4096,
        )
        paths.append(path)
    start = time.perf_counter()
    for path in paths:
        read_image(path)
    figures["dicom_2048px_12bit_images_per_s"] = _rate(len(paths), time.perf_counter() - start)
    return figures


def bench_near_duplicates(context) -> dict:
    """Fingerprint + all-pairs near-duplicate search on the real collection: 1 worker vs all cores."""
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent"}
    from covidcxr.data.dedup import fingerprint_images, near_duplicate_pairs
    from covidcxr.data.sources import load_source
    from covidcxr.parallel import default_workers

    paths = load_source(context.shared_collection).manifest["image"].tolist()
    timings = {}
    for workers in (1, default_workers()):
        start = time.perf_counter()
        prints, _ = fingerprint_images(paths, workers=workers, show_progress=False)
        timings[workers] = time.perf_counter() - start
    start = time.perf_counter()
    pairs = near_duplicate_pairs(prints)
    pair_seconds = time.perf_counter() - start
    cores = default_workers()
    return {
        "images": len(paths),
        "fingerprint_images_per_s_1_worker": _rate(len(paths), timings[1]),
        f"fingerprint_images_per_s_{cores}_workers": _rate(len(paths), timings[cores]),
        "parallel_speedup": round(timings[1] / timings[cores], 2),
        "all_pairs_seconds": round(pair_seconds, 3),
        "pairs_found": int(len(pairs)),
    }


def bench_synthesize(context) -> dict:
    """Phantom synthesis throughput (images + exact masks written as PNG)."""
    from covidcxr.data.synth import synthesize

    figures = {}
    for size, count in ((128, 120), (256, 60)):
        start = time.perf_counter()
        synthesize(context.scratch / f"synth{size}", n_images=count, size=size, seed=0)
        figures[f"images_per_s_{size}px"] = _rate(count, time.perf_counter() - start)
    return figures


def bench_split(context) -> dict:
    """Patient-grouped stratified split and 10-fold assignment on the real collection."""
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent"}
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import group_kfold, split_train_val_test

    manifest = load_source(context.shared_collection).manifest
    start = time.perf_counter()
    split_train_val_test(manifest, stratify=("source", "label"))
    holdout = time.perf_counter() - start
    start = time.perf_counter()
    group_kfold(manifest, n_splits=10)
    kfold = time.perf_counter() - start
    return {"images": len(manifest), "holdout_seconds": round(holdout, 3), "kfold10_seconds": round(kfold, 3)}


BENCHMARKS = [bench_read_images, bench_near_duplicates, bench_synthesize, bench_split]
