"""Data stages at scale: 10k -> 30k -> 100k synthetic fingerprints, and the real collection cold vs warm.

``dedup_index_100k``: for each size, in a fresh process (so its peak RSS is its own):
synthetic fingerprints with 1% planted near-duplicates (`covidcxr.data.synth.synthetic_fingerprints`),
then each data stage timed, with its peak traced allocation (tracemalloc: Python and numpy
allocations, not memory maps nor faiss's C++ index) and its own peak resident set (the process's
high-water mark reset before the stage via ``/proc/self/clear_refs``; it counts the pages of
memory-mapped thumbnails the stage touched and faiss's index):

* ``manifest``: `make_manifest` of N validated rows;
* ``cache_warm``: `fingerprint_images` with every fingerprint in the `FingerprintCache`
  (N empty files stand in for the images; a hit needs only their path, size and mtime);
* ``dedup_index``: `near_duplicate_pairs(method="index")` (at 10k also ``all_pairs``, the
  reference, and whether both found the same pairs), and the planted pairs it found;
* ``groups``: `assign_dup_groups`; ``summary``: `summarize_manifest` (images not re-read).

Decoding images (cold fingerprinting) is measured on real files by ``real_collection``, whose
per-image rate gives the cold time at 100k by proportion (decoding is per image: linear).
``cache_bytes_per_image``: preprocessing cache entries of real images, ``full`` against ``model_only``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

SIZES = (10_000, 30_000, 100_000)


def _resident_mb(field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set to its current one (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _stage(figures: dict, name: str, func):
    """Run ``func`` once, recording seconds, the peak traced allocation and the stage's peak RSS in MB."""
    reset = _reset_peak_rss()
    before = _resident_mb("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    result = func()
    figures[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
    figures[f"{name}_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    peak = _resident_mb("VmHWM")
    if reset and peak is not None and before is not None:
        figures[f"{name}_peak_rss_above_start_mb"] = round(peak - before, 1)
    return result


def _pipeline(count: int, scratch: Path) -> dict:
    """Every data stage at one size (runs in its own process: see `bench_dedup_index_100k`)."""
    from covidcxr.data.dedup import FingerprintCache, assign_dup_groups, fingerprint_images, near_duplicate_pairs
    from covidcxr.data.manifest import make_manifest
    from covidcxr.data.sources import SourceTable
    from covidcxr.data.summary import summarize_manifest
    from covidcxr.data.synth import synthetic_fingerprints

    figures: dict = {"images": count}
    start = time.perf_counter()
    prints, planted = synthetic_fingerprints(count, duplicate_share=0.01, seed=0)
    figures["generate_seconds"] = round(time.perf_counter() - start, 2)

    folder = scratch / f"files-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{k:06d}.png") for k in range(count)]
    for path in paths:
        open(path, "wb").close()
    rng = np.random.default_rng(1)
    records = [
        {"image": p, "source": f"site{k % 5}", "label": ("covid", "pneumonia", "normal", "other")[k % 4],
         "patient_id": f"site{k % 5}:{k // 2}", "view": "PA", "sex": "MF"[k % 2], "age": 20 + k % 60, "sha1": f"{k:040x}"}
        for k, p in enumerate(paths)
    ]  # fmt: skip
    manifest = _stage(figures, "manifest", lambda: make_manifest(records))

    cache = FingerprintCache(scratch / f"cache-{count}.sqlite")
    cache.put_many([(FingerprintCache.key(p), (prints.hashes[k], prints.thumbnails[k])) for k, p in enumerate(paths)])
    warm, _ = _stage(figures, "cache_warm", lambda: fingerprint_images(paths, workers=1, show_progress=False, cache=cache))
    figures["cache_mb"] = round(os.path.getsize(cache.path) / 2**20, 1)
    assert warm.valid.all() and np.array_equal(warm.thumbnails[-1], prints.thumbnails[-1])
    figures["cache_warm_thumbnails_memory_mapped"] = isinstance(warm.thumbnails, np.memmap)
    del warm

    pairs = _stage(figures, "dedup_index", lambda: near_duplicate_pairs(prints, method="index"))
    found = {(int(i), int(j)) for i, j in pairs[["i", "j"]].to_numpy()}
    figures["pairs_found"] = len(pairs)
    figures["planted_pairs"] = len(planted)
    figures["planted_found"] = int(sum(tuple(p) in found for p in planted.tolist()))
    if count <= 10_000:
        reference = _stage(figures, "dedup_all_pairs", lambda: near_duplicate_pairs(prints, method="all_pairs"))
        figures["index_equals_all_pairs"] = bool(reference[["i", "j"]].equals(pairs[["i", "j"]]))
    grouped = _stage(figures, "groups", lambda: assign_dup_groups(manifest, pairs))
    summary = _stage(figures, "summary", lambda: summarize_manifest(SourceTable(grouped), check_images=False))
    figures["duplicate_groups"] = summary["duplicate_groups"]
    figures["summarize_plus_dedup_seconds"] = round(
        sum(figures[f"{s}_seconds"] for s in ("manifest", "cache_warm", "dedup_index", "groups", "summary")), 2
    )
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def bench_cache_bytes_per_image(context) -> dict:
    """Bytes per preprocessing cache entry for real images at 224², ``full`` against ``model_only``.

    A stratified sample of the shared collection (every source), with the default pipeline
    (histogram equalisation, lung U-Net mask, 224×224): one run per mode into its own cache.
    """
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent"}
    from covidcxr.data.sources import load_source
    from covidcxr.preprocess.cache import preprocess_collection
    from covidcxr.preprocess.pipeline import PreprocessConfig

    manifest = load_source(context.shared_collection).manifest
    sample = pd.concat([g.sample(min(len(g), 20), random_state=0) for _, g in manifest.groupby("source")], ignore_index=True)
    config = PreprocessConfig()
    figures: dict = {"images": len(sample), "size": list(config.size)}
    for mode in ("full", "model_only"):
        result = preprocess_collection(sample, config, context.scratch / f"cache-{mode}", progress=False, cache_mode=mode)
        sizes = [(result.config_dir / f).stat().st_size for f in result.index["cache_file"].dropna()]
        figures[f"{mode}_bytes_per_image"] = int(np.mean(sizes))
        figures[f"{mode}_100k_gb_by_proportion"] = round(np.mean(sizes) * 100_000 / 1e9, 2)
        figures[f"{mode}_seconds"] = round(result.seconds, 1)
    figures["model_only_share_of_full"] = round(figures["model_only_bytes_per_image"] / figures["full_bytes_per_image"], 3)
    return figures


def bench_dedup_index_100k(context) -> dict:
    """Scaling of every data stage on 10k, 30k and 100k synthetic fingerprints (one process per size)."""
    figures: dict = {}
    for count in SIZES:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(
            [sys.executable, __file__, str(count), str(context.scratch)], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the {count} stage run failed:\n{done.stderr[-3000:]}")
        figures[f"{count // 1000}k"] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = figures["10k"], figures["100k"]
    for stage in ("manifest", "cache_warm", "dedup_index", "groups", "summary"):
        # growth of time from 10k to 100k: 10 is linear, 100 quadratic
        figures[f"{stage}_time_growth_10k_to_100k"] = round(large[f"{stage}_seconds"] / max(small[f"{stage}_seconds"], 1e-3), 1)
        figures[f"{stage}_peak_mb_growth_10k_to_100k"] = round(large[f"{stage}_peak_mb"] / max(small[f"{stage}_peak_mb"], 1e-3), 1)
    figures["dedup_speedup_over_all_pairs_at_10k"] = round(small["dedup_all_pairs_seconds"] / max(small["dedup_index_seconds"], 1e-3), 1)
    return figures


def bench_real_collection(context) -> dict:
    """The shared collection (2,521 real images): load, fingerprint cold vs warm, dedup, manifest, summarize."""
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent"}
    from covidcxr.data.dedup import FingerprintCache, assign_dup_groups, fingerprint_images, near_duplicate_pairs
    from covidcxr.data.manifest import write_manifest
    from covidcxr.data.sources import load_source
    from covidcxr.data.summary import summarize
    from covidcxr.parallel import default_workers

    figures: dict = {"workers": default_workers()}
    table = _stage(figures, "load_source", lambda: load_source(context.shared_collection))
    paths = table.manifest["image"].tolist()
    figures["images"] = len(paths)
    cache = FingerprintCache(context.scratch / "real-fingerprints.sqlite")
    prints, _ = _stage(figures, "fingerprint_cold", lambda: fingerprint_images(paths, show_progress=False, cache=cache))
    _stage(figures, "fingerprint_warm", lambda: fingerprint_images(paths, show_progress=False, cache=cache))
    figures["fingerprint_cold_images_per_s"] = round(len(paths) / figures["fingerprint_cold_seconds"], 1)
    figures["fingerprint_cold_100k_minutes_by_proportion"] = round(100_000 / figures["fingerprint_cold_images_per_s"] / 60, 1)
    indexed = _stage(figures, "dedup_index", lambda: near_duplicate_pairs(prints, method="index"))
    reference = _stage(figures, "dedup_all_pairs", lambda: near_duplicate_pairs(prints, method="all_pairs"))
    figures["pairs"] = len(indexed)
    figures["index_equals_all_pairs"] = bool(indexed[["i", "j"]].equals(reference[["i", "j"]]))
    grouped = assign_dup_groups(table.manifest.assign(dup_group=None), indexed)
    _stage(figures, "manifest_write", lambda: write_manifest(grouped, context.scratch / "manifest.csv"))
    summary_cache = context.scratch / "summary-cache.sqlite"
    _stage(figures, "summarize_cold", lambda: summarize(context.shared_collection, show_progress=False, cache=summary_cache))
    _stage(figures, "summarize_warm", lambda: summarize(context.shared_collection, show_progress=False, cache=summary_cache))
    # this process only: RUSAGE_CHILDREN would also hold the per-size processes of bench_dedup_index_100k
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


BENCHMARKS = [bench_dedup_index_100k, bench_real_collection, bench_cache_bytes_per_image]

if __name__ == "__main__":  # one size, in its own process: python bench_data_scale.py COUNT SCRATCH
    print(json.dumps(_pipeline(int(sys.argv[1]), Path(sys.argv[2]))))
