"""Distributed training as a grid spanning machines would run it: 2 CPU ranks (gloo DDP) on one machine.

`covidcxr train --devices 2 --strategy ddp --accelerator cpu` is the same Lightning code path as
`--num-nodes N` across machines (each node runs the command with MASTER_ADDR/NODE_RANK set); here
both ranks are processes of this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from generated_data import tiny_train_recipe


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="torch was built without gloo")
def test_two_cpu_ranks_train_one_run(tmp_path: Path) -> None:
    recipe = tiny_train_recipe(tmp_path, "ddp", train={"epochs": 2, "batch_size": 8})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    command = [sys.executable, "-m", "covidcxr.cli", "train", str(path), "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    metrics = yaml.safe_load((run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_trained"] == 2
    assert metrics["engine"]["devices"] in (2, [0, 1], "2") and "ddp" in str(metrics["engine"]["strategy"])
    # Rank 0 alone writes the run: one predictions table covering val + test exactly once.
    predictions = pd.read_parquet(run / "predictions.parquet")
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert sorted(predictions["image"]) == sorted(manifest.loc[manifest["split"].isin(["val", "test"]), "image"])
