"""Inference latency per image, end to end: before vs after, PyTorch vs onnxruntime, with and without Grad-CAM.

One image through `covidcxr.serve.predictor.Predictor.predict_file`, exactly what
``covidcxr predict`` and ``POST /predict`` run: screen (sniff, header) -> decode ->
downscale -> equalise -> lung U-Net -> mask + resize -> classify (+ stage embeddings for the
out-of-distribution check) -> [Grad-CAM] -> warnings and the PNG overlays.

Runs: the shipped ``covid`` model (copied to scratch), and ResNet-18 runs trained here at
128 and 224 px (lungs masked, one epoch on phantoms: the weights do not change the cost,
the architecture and input size do), each exported to ONNX with
`covidcxr.serve.onnx_export.export_onnx`. Images: a real radiograph from the shared
collection (320 px long side, as stored there) when present, else a phantom; and the same
image scaled to 1024 x 1024 (a typical downsampled DICOM).

``serve.predict_speed`` is issue 13's figure: before (the path as the issue measured it,
`benchmarks/_fullres_pipeline.py`) vs after, interleaved call by call, per model, input
size and thread count (1, and every core this process may use); goals: median <= 50 ms at
320 px and <= 80 ms at 1024^2 on 2 quiet cores. ``serve.predict_latency`` is the older
per-engine, with/without Grad-CAM table. The 1-minute load average is recorded before and
after: the project's cores may be shared with other jobs, and with more threads than free
cores PyTorch's and onnxruntime's worker threads wait on each other, so the 1-thread CPU
times are the steadiest figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPEATS = 5
SIZE = 224


def _train_run(scratch) -> object:
    from covidcxr.train import recipe_from_mapping, train_recipe

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    recipe = {
        "name": "bench-serve",
        "seed": 0,
        "data": {"synthetic": {"n_images": 60, "size": 256, "seed": 3}, "task": "covid_vs_rest"},
        "preprocess": {"cache_dir": str(scratch / "cache"), "size": SIZE, "lungs": "mask", "mask_source": "manifest", "workers": 1},
        "model": {"name": "resnet18", "head": "linear"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 16, "checkpoint_every_n_steps": 0},
        "engine": {"threads": 1, "progress_bar": False, "accelerator": "cpu"},
        "output": {"runs_dir": str(scratch / "runs")},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None).run_dir


def _images(context, run_dir) -> dict[str, str]:
    import pandas as pd
    from PIL import Image

    if context.shared_collection is not None:
        manifest = pd.read_csv(context.shared_collection / "manifest.csv")
        source = str(context.shared_collection / manifest.loc[manifest["source"] == "nih", "image"].iloc[0])
        label = "shared_nih_320px"
    else:
        run_manifest = pd.read_parquet(run_dir / "manifest.parquet")
        source = str(run_manifest.loc[run_manifest["split"] == "test", "image"].iloc[0])
        label = "phantom_256px"
    large = context.scratch / "serve_1024.png"
    Image.open(source).convert("L").resize((1024, 1024), Image.Resampling.BICUBIC).save(large)
    return {label: source, "1024px": str(large)}


def _median_latency(predictor, image: str, gradcam: bool) -> dict:
    predictor.predict_file(image, gradcam=gradcam)  # warm-up: kernels chosen and cached
    timings = [predictor.predict_file(image, gradcam=gradcam).timings_ms for _ in range(REPEATS)]
    stages = {stage: round(float(np.median([t[stage] for t in timings])), 1) for stage in timings[0]}
    return {"ms_median": stages.pop("total"), "ms_min": round(min(t["total"] for t in timings), 1), "stages_ms": stages}


def bench_predict_latency(context) -> dict:
    """Per-image latency of predict, PyTorch vs onnxruntime, with/without Grad-CAM, 1 thread vs all cores."""
    import torch

    from covidcxr.serve.onnx_export import export_onnx
    from covidcxr.serve.predictor import Predictor

    load_before = os.getloadavg()[0]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = _train_run(context.scratch)
    started = time.perf_counter()
    export = export_onnx(run_dir)
    export_seconds = round(time.perf_counter() - started, 1)
    images = _images(context, run_dir)
    cores = len(os.sched_getaffinity(0))

    figures: dict = {
        "model": f"resnet18, {SIZE} px input, lungs masked; lung U-Net 256 px",
        "repeats": REPEATS,
        "cores": cores,
        "load_avg_1min_before": round(load_before, 2),
        "onnx_export_seconds": export_seconds,
        "onnx_max_abs_diff_probability": export["classifier"]["max_abs_diff_probability"],
        "onnx_lung_unet_max_abs_diff": export["lung_unet"]["max_abs_diff_probability"],
        "onnx_mask_dice_vs_torch_bf16": export["lung_unet"]["mask_dice_vs_torch_bf16_fast_path_mean"],
        "latency": {},
    }
    try:
        for threads in sorted({1, cores}):
            for engine in ("torch", "onnx"):
                predictor = Predictor.load(run_dir, engine=engine, threads=threads)
                for name, image in images.items():
                    for gradcam in (False, True):
                        key = f"{engine}/{threads}thread{'s' if threads > 1 else ''}/{name}/{'gradcam' if gradcam else 'no_gradcam'}"
                        figures["latency"][key] = _median_latency(predictor, image, gradcam)
    finally:
        torch.set_num_threads(threads_before)
    one = {k: v["ms_median"] for k, v in figures["latency"].items() if "/1thread/" in k}
    figures["summary_ms_1thread"] = one
    figures["goal_under_150ms_without_gradcam_1thread"] = all(v < 150 for k, v in one.items() if k.endswith("no_gradcam"))
    figures["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


BENCHMARKS = [bench_predict_latency]


# ---------------------------------------------------------------- hostile clients, load and soak 

_SERVER_SCRIPT = '''
import sys

import uvicorn

from covidcxr.serve.app import ServeSettings, create_app
from covidcxr.serve.predictor import Predictor
from covidcxr.serve.server import ServerLimits, build_server, tame_malloc

stack, run_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if stack == "after":
    tame_malloc()
app = create_app(Predictor.load(run_dir, threads=1), ServeSettings())
if stack == "after":
    build_server(app, "127.0.0.1", port, ServerLimits(header_timeout=5.0), log_level="warning").run()
else:  # the stack as main ran it: no head deadline, limit_concurrency=64, glibc's default arenas
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", server_header=False, timeout_keep_alive=5, limit_concurrency=64)
'''
STALLED = 100
LOAD_CLIENTS, LOAD_REQUESTS = 20, 10
SOAK_REQUESTS, SOAK_CLIENTS = 1000, 4


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(context, stack: str, run_dir) -> tuple:
    import subprocess
    import sys

    import httpx

    script = context.scratch / "serve_bench_server.py"
    script.write_text(_SERVER_SCRIPT)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_ARENA_MAX", None)
    process = subprocess.Popen([sys.executable, str(script), stack, str(run_dir), str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # the first start builds the out-of-distribution reference
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {stack} server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def _stalled_sockets(url: str, port: int) -> dict:
    """100 half-sent request heads; /health meanwhile; how long until the server closes them (capped at 15 s)."""
    import socket

    import httpx

    opened = time.monotonic()
    sockets = []
    for _ in range(STALLED):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-da")
        sockets.append(sock)
    with httpx.Client(timeout=10) as http:
        started = time.perf_counter()
        try:
            status = http.get(url + "/health").status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        health_ms = round((time.perf_counter() - started) * 1000, 1)
    closed_after = []
    for sock in sockets:
        sock.settimeout(None)
        sock.setblocking(True)
        left = opened + 15 - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            while sock.recv(4096):
                pass
            closed_after.append(time.monotonic() - opened)
        except (socket.timeout, ConnectionResetError) as exc:
            if isinstance(exc, ConnectionResetError):
                closed_after.append(time.monotonic() - opened)
    for sock in sockets:
        sock.close()
    return {
        "health_status_with_100_stalled": status,
        "health_ms_with_100_stalled": health_ms,
        "stalled_closed_by_server": len(closed_after),
        "stalled_closed_within_s_max": round(max(closed_after), 2) if closed_after else None,
    }


def _requests(url: str, payloads: list[bytes], total: int, clients: int, pid: int, rss_at: tuple[int, ...] = ()) -> dict:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    counter = iter(range(total))
    lock = threading.Lock()
    latencies, errors, rss = [], [], {}

    def client(_: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                response = http.post("/predict", files={"file": ("x.png", payloads[index % len(payloads)])}, params={"gradcam": "false"})
                seconds = time.perf_counter() - started
                with lock:
                    latencies.append(seconds)
                    if response.status_code != 200:
                        errors.append(response.status_code)
                    done = len(latencies)
                    if done in rss_at:
                        rss[str(done)] = _rss_mb(pid)

    rss["0"] = _rss_mb(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    array = np.array(latencies)
    return {
        "requests": total,
        "clients": clients,
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
        "ms_p50": round(float(np.median(array)) * 1000, 1),
        "ms_p95": round(float(np.percentile(array, 95)) * 1000, 1),
        "requests_per_s": round(total / wall, 2),
        "server_rss_mb": rss,
    }


def bench_hostile_load_soak(context) -> dict:
    """The service under hostile and sustained load, stack before (main's uvicorn settings) vs after (deadlines, admission, tamed malloc).

    A server process per stack (same app, same run, 1 torch thread): 100 stalled
    half-sent heads (does /health answer, are they closed), a load test of 20 clients x
    10 requests and a 1,000-request soak (4 clients) alternating a 320-px radiograph and
    a 1024 x 1024 image without Grad-CAM, with the server's RSS at the start, after 100
    requests and at the end.
    """
    run_dir = _train_run(context.scratch)
    images = _images(context, run_dir)
    payloads = [open(path, "rb").read() for path in images.values()]
    figures: dict = {"images": list(images), "cores": len(os.sched_getaffinity(0)), "load_avg_1min_before": round(os.getloadavg()[0], 2)}
    for stack in ("before", "after"):
        process, url = _start_server(context, stack, run_dir)
        try:
            port = int(url.rsplit(":", 1)[1])
            block: dict = {"rss_mb_idle": _rss_mb(process.pid)}
            _requests(url, payloads, 4, 1, process.pid)  # warm-up
            block["stalled"] = _stalled_sockets(url, port)
            block["load_20x10"] = _requests(url, payloads, LOAD_CLIENTS * LOAD_REQUESTS, LOAD_CLIENTS, process.pid, rss_at=(100, 200))
            block["soak_1000"] = _requests(url, payloads, SOAK_REQUESTS, SOAK_CLIENTS, process.pid, rss_at=(100, 500, 1000))
            figures[stack] = block
        finally:
            process.terminate()
            process.wait(timeout=30)
    figures["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


BENCHMARKS.append(bench_hostile_load_soak)


# ---------------------------------------------------------------- speed: before vs after "downscale first"

SPEED_REPEATS = 15  # timed predictions per (input size, threads, before/after), interleaved
EVAL_SAMPLE = 150  # images of the shared collection in the interleaved evaluate passes


def _speed_run(scratch, size: int = SIZE):
    """ResNet-18 at ``size`` px, lungs masked by the U-Net (what predict and ``evaluate --data`` run); trains once per scratch and size."""
    from covidcxr.train import recipe_from_mapping, train_recipe

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    recipe = {
        "name": "bench-speed" if size == SIZE else f"bench-speed-{size}",
        "seed": 0,
        "data": {"synthetic": {"n_images": 60, "size": 256, "seed": 3}, "task": "covid_vs_rest"},
        "preprocess": {"cache_dir": str(scratch / "speed-cache"), "size": size, "lungs": "mask", "mask_source": "model"},
        "model": {"name": "resnet18", "head": "linear"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 16, "checkpoint_every_n_steps": 0},
        "engine": {"threads": 1, "progress_bar": False, "accelerator": "cpu"},
        "output": {"runs_dir": str(scratch / "speed-runs")},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None).run_dir


class _ContiguousClassifier:
    """`covidcxr.serve.engines.TorchClassifier` as it was before: float32 in the default (contiguous) layout."""

    name = "torch"

    def __init__(self, module):
        import torch

        self.module = module.to(memory_format=torch.contiguous_format)

    def __call__(self, images):
        import torch

        with torch.inference_mode():
            p, e = self.module(torch.from_numpy(np.asarray(images, dtype=np.float32)[:, None]))
        return p.float().numpy().astype(np.float64), e.float().numpy()


def _summary(walls: list[float], cpus: list[float]) -> dict:
    return {
        "ms_median": round(float(np.median(walls)), 1),
        "ms_p95": round(float(np.percentile(walls, 95)), 1),
        "cpu_ms_median": round(float(np.median(cpus)), 1),
    }


def _shipped_copy(scratch: Path) -> Path:
    """The shipped ``covid`` model copied to scratch (its ONNX export is written beside it, never into the package)."""
    import shutil

    from covidcxr.zoo import resolve

    target = scratch / "shipped-covid"
    if not target.exists():
        shutil.copytree(resolve("covid"), target)
    return target


def _speed_models(context) -> dict[str, Path]:
    """The runs timed: the shipped model `covidcxr serve` serves by default, the demo's network (ResNet-18 at 128 px), a ResNet-18 at 224 px."""
    return {
        "shipped covid (small_cnn, 128 px; what `covidcxr serve` serves by default)": _shipped_copy(context.scratch),
        "resnet18, 128 px (the network and input size of `make demo`'s run, which issue 13 timed)": _speed_run(context.scratch, 128),
        f"resnet18, {SIZE} px (lungs masked; trained 1 epoch on phantoms: speed only)": _speed_run(context.scratch),
    }


def _time_model(run_dir: Path, images: dict[str, str], cores: int) -> dict:
    """Before / after (PyTorch) / after (auto: onnxruntime on the run's export) for one run, interleaved."""
    import torch

    from covidcxr.serve.onnx_export import export_onnx
    from covidcxr.serve.predictor import Predictor

    sys_path_add = str(Path(__file__).resolve().parent)
    if sys_path_add not in sys.path:
        sys.path.insert(0, sys_path_add)
    from _fullres_pipeline import installed, unfolded_segmenter

    export_onnx(run_dir)
    figures: dict = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        after = Predictor.load(run_dir, engine="torch", threads=threads)
        auto = Predictor.load(run_dir, threads=threads)  # engine "auto": the export just written
        before = Predictor.load(run_dir, engine="torch", threads=threads)
        before.classifier = _ContiguousClassifier(before.torch_classifier.module)
        before.segmenter = unfolded_segmenter(before.config.segmenter_weights)
        arms = (("before", before), ("after", after), ("after_auto", auto))
        for name, image in images.items():
            times: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key, _ in arms}
            stages: dict[str, list[dict]] = {key: [] for key, _ in arms}
            for repeat in range(SPEED_REPEATS + 1):  # round 0: warm-up, not counted
                for key, predictor in arms if repeat % 2 == 0 else arms[::-1]:
                    with installed([predictor.segmenter]) if key == "before" else contextlib.nullcontext():
                        wall, cpu = time.perf_counter(), time.process_time()
                        result = predictor.predict_file(image, gradcam=False)
                        if repeat:
                            times[key][0].append((time.perf_counter() - wall) * 1000)
                            times[key][1].append((time.process_time() - cpu) * 1000)
                            stages[key].append(result.timings_ms)
            entry: dict = {key: _summary(*values) for key, values in times.items()}
            entry["after_auto"]["engine"] = auto.engine
            for key in ("after", "after_auto"):
                entry[f"speedup_median_{key}"] = round(entry["before"]["ms_median"] / entry[key]["ms_median"], 2)
                entry[f"{key}_stages_ms_median"] = {s: round(float(np.median([t[s] for t in stages[key]])), 1) for s in stages[key][0] if s != "total"}
            figures[f"{name}/{threads}thread{'s' if threads > 1 else ''}"] = entry
    return figures


def bench_predict_speed(context) -> dict:
    """End-to-end predict (no Grad-CAM), before vs after, interleaved in one process, per model, input size and thread count.

    Before = the predict path as issue 13 measured it, rebuilt in-process
    (`benchmarks/_fullres_pipeline.py`: full-resolution preprocessing, PIPELINE_VERSION 2,
    the U-Net under bf16 autocast with unfolded BatchNorms, scikit-image/MONAI
    post-processing, enlarged overlays) with a contiguous PyTorch classifier; after = the
    library as it is on PyTorch (``engine="torch"``) and as it runs by default
    (``engine="auto"``: onnxruntime when the run has a current ONNX export, written here).
    The arms alternate call by call (ABBA) so the machine's load hits them alike;
    wall-clock median and p95, and the median CPU time of the process
    (``time.process_time``: the figure load inflates least, meaningful at 1 thread).
    """
    import torch

    load_before = os.getloadavg()
    threads_before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    models = _speed_models(context)
    images = _images(context, list(models.values())[-1])  # without the shared collection: a phantom of the speed run
    figures: dict = {
        "cores": cores,
        "repeats_each": SPEED_REPEATS,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_before": [round(v, 2) for v in load_before],
        "models": {},
    }
    try:
        for label, run_dir in models.items():
            figures["models"][label] = _time_model(run_dir, images, cores)
    finally:
        torch.set_num_threads(threads_before)
    load_after = os.getloadavg()
    figures["load_avg_after"] = [round(v, 2) for v in load_after]
    default = next(iter(figures["models"].values()))
    best = {key.split("/")[0]: min(v["after"]["ms_median"], v["after_auto"]["ms_median"]) for key, v in default.items() if key.endswith(f"/{cores}threads") or cores == 1}
    small = next((v for k, v in best.items() if k != "1024px"), None)
    figures["goals_default_model_all_cores"] = {
        "320px_median_le_50ms": None if small is None else small <= 50,
        "1024px_median_le_80ms": best.get("1024px", float("inf")) <= 80,
        "note": f"goals are for 2 quiet cores; the 1-minute load average was {load_before[0]:.1f} before and {load_after[0]:.1f} after "
        "(with load above the core count wall-clock figures are upper bounds; cpu_ms at 1 thread is the steadier figure)",
    }
    return figures


BENCHMARKS.append(bench_predict_speed)


def _sample_collection(shared: Path, target: Path, count: int) -> Path:
    """A collection of ``count`` rows of the shared one (every k-th, all sources): its manifest + links to the source folders."""
    import pandas as pd

    manifest = pd.read_csv(shared / "manifest.csv", dtype=str, keep_default_na=False)
    target.mkdir(parents=True, exist_ok=True)
    step = max(1, len(manifest) // count)
    manifest.iloc[::step].head(count).to_csv(target / "manifest.csv", index=False)
    for source in manifest["source"].unique():
        link = target / source
        if not link.exists():
            link.symlink_to(shared / source, target_is_directory=True)
    return target


_BEFORE_DRIVER = (
    "import sys; sys.path.insert(0, {bench!r}); from _fullres_pipeline import installed; from covidcxr.cli import main; "
    "sys.argv = ['covidcxr', *sys.argv[1:]]\nwith installed(): main()"
)


def _evaluate_pass(run_dir: Path, data: Path, name: str, cache: Path, before: bool, fresh: bool = True) -> dict:
    """One ``covidcxr evaluate RUN --data DATA`` child process: seconds, images, peak RSS."""
    import json
    import resource
    import shutil
    import subprocess

    if fresh and cache.exists():
        shutil.rmtree(cache)  # every cold pass starts from an empty preprocessing cache
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "COVIDCXR_CACHE_DIR": str(cache.parent / "fingerprints")}
    args = ["evaluate", str(run_dir), "--data", str(data), "--name", name, "--json", "--n-boot", "100"]
    command = [sys.executable, "-c", _BEFORE_DRIVER.format(bench=str(Path(__file__).resolve().parent)), *args] if before else [sys.executable, "-m", "covidcxr.cli", *args]
    peak_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=repo)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"covidcxr {' '.join(args)} failed: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "seconds": round(seconds, 1),
        "images": int(report["n_candidates"]),
        "images_per_s": round(report["n_candidates"] / seconds, 2),
        "peak_rss_mb_children_so_far": int(max(peak, peak_before) / 1024),
    }


def bench_evaluate_speed(context) -> dict:
    """``covidcxr evaluate RUN --data`` on the shared collection: before vs after on a sample (ABBA), then the whole collection after.

    Each pass is a fresh CLI process with an empty preprocessing cache (so it counts the
    decode, the lung U-Net and the classifier); the resumed rerun is the whole-collection
    command again (every image already scored). Peak memory is the largest child RSS so far
    (``RUSAGE_CHILDREN``), so the whole-collection figure is an upper bound of that pass.
    """
    if context.shared_collection is None:
        return {"skipped": "the shared collection is absent (../shared/data/cxr)"}
    run_dir = _speed_run(context.scratch)
    cache = Path(json_cache_dir(run_dir))
    sample = _sample_collection(context.shared_collection, context.scratch / "speed-sample", EVAL_SAMPLE)
    load_before = os.getloadavg()
    passes = {}
    for i, before in enumerate((True, False, False, True)):  # ABBA
        key = f"{'before' if before else 'after'}_{i}"
        passes[key] = _evaluate_pass(run_dir, sample, f"speed-{key}", cache, before)
    rate = {k: np.mean([v["images_per_s"] for n, v in passes.items() if n.startswith(k)]) for k in ("before", "after")}
    figures: dict = {
        "run": "resnet18 at 224 px, lungs masked by the lung U-Net (trained 1 epoch on phantoms: speed only)",
        "sample_images": EVAL_SAMPLE,
        "sample_passes": passes,
        "sample_images_per_s": {k: round(float(v), 2) for k, v in rate.items()},
        "sample_speedup": round(float(rate["after"] / rate["before"]), 2),
    }
    whole = _evaluate_pass(run_dir, context.shared_collection, "speed-whole", cache, before=False)
    rerun = _evaluate_pass(run_dir, context.shared_collection, "speed-whole", cache, before=False, fresh=False)
    figures["whole_collection_after"] = {**whole, "resumed_rerun_seconds": rerun["seconds"]}
    figures["goal_50_images_per_s"] = whole["images_per_s"] >= 50
    figures["load_avg_before"] = [round(v, 2) for v in load_before]
    figures["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    return figures


def json_cache_dir(run_dir: Path) -> str:
    """The preprocessing cache folder of a run (its recipe's ``preprocess.cache_dir``)."""
    from covidcxr.rundir import RunDir

    return str(RunDir(run_dir).read_recipe().preprocess.cache_dir)


BENCHMARKS.append(bench_evaluate_speed)


def bench_network_settings(context) -> dict:
    """CPU ms per image of the two networks under each setting, 1 thread, interleaved (what `LungSegmenter` and `load_run` choose).

    U-Net (shipped weights, 256 px, batch 1): float32 contiguous, float32 channels-last, bf16
    autocast channels-last. ResNet-18 (224 px, 1 -> 3 channels as the runs have it; random
    weights: the cost does not depend on their values) at batch 1 and 32: contiguous vs
    channels-last. ``time.process_time`` medians over interleaved rounds (the load moves
    less of it than wall time). ``bf16_pays`` is what the library decides on this CPU.
    """
    from contextlib import nullcontext

    import torch

    from covidcxr.models import create_model
    from covidcxr.preprocess.lungs import bf16_pays, load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rounds = 5

    def cpu_ms(module, x, fmt, bf16=False) -> float:
        module.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.inference_mode(), context:
            module(x)  # warm-up (kernel selection)
            start = time.process_time()
            module(x)
        return (time.process_time() - start) * 1000 / len(x)

    try:
        unet = load_model(None)[0].eval()
        resnet = create_model("resnet18", num_classes=1, in_channels=1, head="linear").eval()
        cases = {
            "unet_256_batch1/fp32_contiguous": (unet, (1, 1, 256, 256), torch.contiguous_format, False),
            "unet_256_batch1/fp32_channels_last": (unet, (1, 1, 256, 256), torch.channels_last, False),
            "unet_256_batch1/bf16_channels_last": (unet, (1, 1, 256, 256), torch.channels_last, True),
            "resnet18_224_batch1/fp32_contiguous": (resnet, (1, 1, 224, 224), torch.contiguous_format, False),
            "resnet18_224_batch1/fp32_channels_last": (resnet, (1, 1, 224, 224), torch.channels_last, False),
            "resnet18_224_batch32/fp32_contiguous": (resnet, (32, 1, 224, 224), torch.contiguous_format, False),
            "resnet18_224_batch32/fp32_channels_last": (resnet, (32, 1, 224, 224), torch.channels_last, False),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(rounds):
            names = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in names:
                module, shape, fmt, bf16 = cases[name]
                samples[name].append(cpu_ms(module, torch.rand(shape), fmt, bf16))
    finally:
        torch.set_num_threads(threads)
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_pays_here": bf16_pays(),
        "rounds": rounds,
        "cpu_ms_per_image_median": {name: round(float(np.median(v)), 1) for name, v in samples.items()},
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


BENCHMARKS.append(bench_network_settings)
