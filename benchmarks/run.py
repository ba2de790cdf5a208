"""Run every benchmark in this folder and write one JSON of figures.

Each ``bench_*.py`` module exposes ``BENCHMARKS``: a list of functions taking the
`Context` and returning a dict of figures. Figures are throughputs on this machine's CPU
(the project's machines and CI have 2 cores); each benchmark that has a faster path also
measures the plain baseline in the same run and reports the ratio.

Usage: ``python benchmarks/run.py --out benchmarks/results.json [--only NAME]``

With ``--only`` the figures of the selected benchmarks replace their own entries in an
existing ``--out`` file and every other entry is kept, so one slow benchmark can be rerun
without rerunning the rest (each entry carries its own ``measured_at``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_COLLECTION = HERE.parent.parent / "shared" / "data" / "cxr"


@dataclass
class Context:
    """What every benchmark may use: a scratch folder and the real collection (or None)."""

    scratch: Path
    shared_collection: Path | None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--only", default=None, help="run only benchmarks whose name contains this")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))

    import torch

    from covidcxr import __version__
    from covidcxr.io.atomic import atomic_write_text

    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "covidcxr": __version__,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benchmarks": {},
    }
    shared = SHARED_COLLECTION if (SHARED_COLLECTION / "manifest.csv").is_file() else None
    with tempfile.TemporaryDirectory(prefix="covidcxr-bench-") as scratch:
        context = Context(Path(scratch), shared)
        for module_path in sorted(HERE.glob("bench_*.py")):
            module = importlib.import_module(module_path.stem)
            for bench in module.BENCHMARKS:
                name = f"{module_path.stem.removeprefix('bench_')}.{bench.__name__.removeprefix('bench_')}"
                if args.only and args.only not in name:
                    continue
                print(f"[bench] {name} ...", flush=True)
                start = time.perf_counter()
                figures = bench(context)
                figures["wall_seconds"] = round(time.perf_counter() - start, 2)
                figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                results["benchmarks"][name] = figures
                print(f"[bench] {name}: {json.dumps(figures)}", flush=True)
    if args.only and args.out.is_file():
        previous = json.loads(args.out.read_text())
        results["benchmarks"] = {**previous.get("benchmarks", {}), **results["benchmarks"]}
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
