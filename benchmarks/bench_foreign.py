"""``covidcxr evaluate|audit --model MODEL.yaml --data DIR``: a foreign ONNX model's cost and its audit's verdicts.

The two plain-torch classifiers of ``tests/foreign_models.py`` (hand-set weights, exported to
ONNX; no covidcxr code) on 300 phantoms of three sites (128 px, resized to the models' 64 px
input; a corner text marker on COVID images of site_c). Each step is a fresh CLI process with
empty caches: the first evaluation (copy linking, preprocessing, scoring), the resumed rerun
(nothing re-scored) and the black-box audit (ablation, intensity window, probe, occlusion
saliency on every image). The verdicts are recorded too: the corner reader must be called a
shortcut, the lung reader must not.
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

MODEL_YAML = """name: {name}
format: onnx
path: {name}.onnx
input: {{height: 64, width: 64, channels: 1, range: [0, 1]}}
preprocess: {{equalization: {equalization}, lungs: none, mask_source: manifest}}
output: {{kind: probability, positive_label: covid, negative_labels: [normal]{embedding}}}
"""


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Seconds, peak RSS (MB) of one child run of the CLI, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "covidcxr.cli", *args], env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"covidcxr {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return seconds, int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024), proc.stdout


def _setup(scratch: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from covidcxr.data.synth import ShortcutSpec, synthesize
    from foreign_models import corner_reader, export_onnx, lung_reader

    synthesize(scratch / "phantoms", n_images=300, size=128, shortcut=ShortcutSpec("marker", site="site_c"), seed=3, finding_scale=2.0)
    models = scratch / "models"
    models.mkdir(exist_ok=True)
    export_onnx(corner_reader(), models / "corner.onnx")
    export_onnx(lung_reader(), models / "lungs.onnx")
    (models / "corner.yaml").write_text(MODEL_YAML.format(name="corner", equalization="none", embedding=", embedding: embedding"))
    (models / "lungs.yaml").write_text(MODEL_YAML.format(name="lungs", equalization="histogram", embedding=""))
    return scratch / "phantoms"


def bench_phantoms(context) -> dict:
    scratch = context.scratch / "foreign"
    scratch.mkdir(parents=True, exist_ok=True)
    phantoms = _setup(scratch)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "COVIDCXR_CACHE_DIR": str(scratch / "fingerprints")}
    out: dict = {"collection_images": 300}
    for name in ("corner", "lungs"):
        common = ["--model", str(scratch / "models" / f"{name}.yaml"), "--data", str(phantoms), "--out", str(scratch / "out" / name),
                  "--cache-dir", str(scratch / f"cache-{name}"), "--json", "--n-boot", "200"]
        first, peak, stdout = _cli(["evaluate", *common], env)
        report = json.loads(stdout)
        rerun, _, _ = _cli(["evaluate", *common], env)
        audit_seconds, peak_audit, stdout = _cli(["audit", *common, "--saliency-images", "300"], env)
        audit = json.loads(stdout)
        out[name] = {
            "scored": report["overall"]["n_images"],
            "auc": report["overall"]["auc"],
            "first_pass_seconds": round(first, 1),
            "images_per_second": round(report["n_candidates"] / first, 1),
            "resumed_rerun_seconds": round(rerun, 1),
            "audit_seconds": round(audit_seconds, 1),
            "peak_rss_mb": max(peak, peak_audit),
            "verdict": audit["verdict"],
        }
    out["corner_called_shortcut"] = out["corner"]["verdict"] == "shortcut"
    out["lungs_not_called_shortcut"] = out["lungs"]["verdict"] not in ("shortcut", "no_skill")
    return out


BENCHMARKS = [bench_phantoms]
