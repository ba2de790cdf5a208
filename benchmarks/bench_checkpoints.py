"""What a run keeps on disk, and new images through a run's preprocessing (issue 16, "fit the ecosystem").

* ``checkpoints.checkpoint_sizes_resnet18``: one ResNet-18 run (MONAI ``resnet18``, Adam; 1 epoch on
  48 64-px phantoms — the file sizes do not depend on the data) and the size of each
  checkpoint. ``best.ckpt`` is now weights-only; before this change it held the same full
  state as ``last.ckpt`` (weights + Adam's two moment buffers + callback state), so
  ``before_per_run_mb`` is twice the full checkpoint. Then the disk per run under each
  ``output.keep`` policy (`covidcxr.train.callbacks.keep_checkpoints`, applied to copies of
  the run) and what a 100-run grid needs.
* ``checkpoints.predict_files``: images per second of `LoadedRun.predict_files` (screen, read,
  equalise, lung U-Net, resize, classify) for 32 PNGs with a 64-px conv8 run, one thread —
  the preprocessing dominates.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

MB = 1024 * 1024


def _recipe(scratch: Path, name: str, model: dict, n_images: int) -> dict:
    return {
        "name": name,
        "data": {"synthetic": {"n_images": n_images, "size": 64, "seed": 1}, "task": "covid_vs_rest", "split": {"test_size": 0.25, "val_size": 0.25}},
        "preprocess": {"cache_dir": str(scratch / "cache"), "size": 64, "mask_source": "manifest", "lungs": "none", "workers": 1},
        "model": model,
        "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 1, "batch_size": 8, "checkpoint_every_n_steps": 0},
        "engine": {"threads": 1, "progress_bar": False},
        "output": {"runs_dir": str(scratch / "runs")},
    }


def _train(recipe: dict):
    from covidcxr.train import recipe_from_mapping, train_recipe

    return train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None)


def _folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.glob("*.ckpt")) / MB, 2)


def bench_checkpoint_sizes_resnet18(context) -> dict:
    import torch

    from covidcxr.models.freeze import count_parameters
    from covidcxr.train.callbacks import keep_checkpoints
    from covidcxr.train.module import load_checkpoint_model

    torch.set_num_threads(1)
    result = _train(_recipe(context.scratch, "resnet18-keep", {"name": "resnet18"}, 48))
    checkpoints = result.run_dir / "checkpoints"
    best_mb = (checkpoints / "best.ckpt").stat().st_size / MB
    last_mb = (checkpoints / "last.ckpt").stat().st_size / MB
    model, _ = load_checkpoint_model(checkpoints / "best.ckpt")
    out: dict = {
        "model": "resnet18 (MONAI), 1 input channel, Adam",
        "parameters": count_parameters(model)["total"],
        "best_ckpt_mb": round(best_mb, 2),
        "last_ckpt_mb": round(last_mb, 2),
        "before_best_ckpt_mb": round(last_mb, 2),
        "before_per_run_mb": round(2 * last_mb, 2),
    }
    for keep in ("all", "best", "last"):
        copy = context.scratch / f"keep-{keep}"
        shutil.copytree(result.run_dir, copy)
        keep_checkpoints(copy, keep)
        out[f"keep_{keep}_per_run_mb"] = _folder_mb(copy / "checkpoints")
        shutil.rmtree(copy)
    out["grid_100_runs_gb"] = {
        "before": round(100 * out["before_per_run_mb"] / 1024, 2),
        **{f"keep_{k}": round(100 * out[f"keep_{k}_per_run_mb"] / 1024, 2) for k in ("all", "best", "last")},
    }
    return out


def bench_predict_files(context) -> dict:
    import torch

    from covidcxr.train.inference import load_run

    torch.set_num_threads(1)
    result = _train(_recipe(context.scratch, "conv8-predict", {"name": "conv8", "arch_kwargs": {"width": 8}}, 64))
    run = load_run(result.run_dir)
    import pandas as pd

    paths = pd.read_parquet(result.run_dir / "manifest.parquet")["image"].tolist()[:32]
    run.predict_files(paths[:2])  # loads the U-Net once
    start = time.perf_counter()
    table = run.predict_files(paths, batch_size=16)
    seconds = time.perf_counter() - start
    return {
        "images": len(paths),
        "size": 64,
        "threads": 1,
        "images_per_second": round(len(paths) / seconds, 2),
        "errors": int(table["error"].notna().sum()),
        "probability_range": [round(float(np.nanmin(table["probability"])), 4), round(float(np.nanmax(table["probability"])), 4)],
    }


BENCHMARKS = [bench_checkpoint_sizes_resnet18, bench_predict_files]
