"""``covidcxr evaluate RUN --data DIR`` on the shared collection: images/s, peak memory, resumed rerun.

The run is a ResNet-18 trained on two shared sources (`recipes/small_shared.yaml`: Cohen +
Kermany negatives, COVID vs rest) at 64 px for 2 epochs — or the run named by
``$COVIDCXR_BENCH_EXTERNAL_RUN`` (trained beforehand, e.g. with the command in the README).
Each pass is a fresh ``covidcxr evaluate`` process with its own empty preprocessing and
fingerprint caches, so the first pass counts everything a new user waits for (copy linking,
lung U-Net, classifier); the second pass is the resumed rerun (every image already scored).
Peak memory is the child process' maximum resident set size.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Seconds, peak RSS (MB) of one child run of the CLI, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "covidcxr.cli", *args], env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"covidcxr {' '.join(args)} failed: {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, int(max(peak, before) / 1024), proc.stdout


def bench_evaluate_data(context) -> dict:
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent"}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "COVIDCXR_CACHE_DIR": str(context.scratch / "external-cache")}
    run = os.environ.get("COVIDCXR_BENCH_EXTERNAL_RUN")
    if not run:
        runs = context.scratch / "external-runs"
        _cli(["train", "recipes/small_shared.yaml", "--set", "train.epochs=2", "--set", "preprocess.size=64",
              "--set", f"preprocess.cache_dir={context.scratch / 'external-cache'}", "--set", f"output.runs_dir={runs}"], env)
        run = str(runs / "small_shared")
    args = ["evaluate", run, "--data", str(context.shared_collection), "--name", "bench-external", "--json", "--n-boot", "200"]
    first, peak, stdout = _cli(args, env)
    report = json.loads(stdout)
    scored = sum(m["n_images"] for m in report["per_source"].values())
    rerun, peak_rerun, _ = _cli(args, env)
    return {
        "run": Path(run).name,
        "collection_images": report["n_candidates"],
        "excluded": report["excluded"]["n"],
        "refused": report["rejected"]["n"],
        "scored": scored,
        "first_pass_seconds": round(first, 1),
        "images_per_second": round(report["n_candidates"] / first, 1),
        "peak_rss_mb": peak,
        "resumed_rerun_seconds": round(rerun, 1),
        "per_source_auc": {s: (m.get("auc") or {}).get("estimate") for s, m in report["per_source"].items()},
    }


BENCHMARKS = [bench_evaluate_data]
