"""One writer per run folder: a second ``train`` is refused and told who holds it; partial checkpoints are cleaned."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from covidcxr.io.checkpoint import CheckpointError
from covidcxr.io.lock import FolderLocked, RunLock
from covidcxr.train import RunConflictError, recipe_from_mapping, train_recipe
from generated_data import tiny_train_recipe


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    recipe = recipe_from_mapping(tiny_train_recipe(tmp_path, "locked"))
    run_dir = recipe.run_dir()
    with RunLock(run_dir, command="covidcxr train recipes/first.yaml"):
        with pytest.raises(FolderLocked) as refused:
            train_recipe(recipe, progress=False, say=lambda _: None)
    message = str(refused.value)
    assert str(run_dir) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "covidcxr train recipes/first.yaml" in message
    assert not (run_dir / "checkpoints").exists()  # nothing was written by the refused writer


def test_cli_train_says_who_holds_the_run_folder(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from covidcxr.cli import app

    recipe_path = tmp_path / "recipe.yaml"
    mapping = tiny_train_recipe(tmp_path, "cli-locked")
    recipe_path.write_text(yaml.safe_dump(mapping))
    run_dir = recipe_from_mapping(mapping).run_dir()
    with RunLock(run_dir, command="covidcxr train elsewhere.yaml"):
        result = CliRunner().invoke(app, ["train", str(recipe_path)])
    assert result.exit_code != 0
    text = result.output + str(result.exception or "")
    assert "in use by another writer" in text and f"pid {os.getpid()}" in text and "Aborted" not in result.output


def test_partial_checkpoints_are_removed_and_a_tampered_last_is_refused(tmp_path: Path) -> None:
    recipe = recipe_from_mapping(tiny_train_recipe(tmp_path, "crashy"))
    checkpoints = recipe.run_dir() / "checkpoints"
    checkpoints.mkdir(parents=True)
    partial = checkpoints / ".last.k2j4_x9a.tmp.ckpt"  # what a kill -9 during torch.save leaves
    partial.write_bytes(b"half a checkpoint")
    said: list[str] = []
    result = train_recipe(recipe, progress=False, say=said.append)
    assert result.status == "trained" and not partial.exists()
    assert any("partial checkpoint" in line and str(partial) in line for line in said)

    # a checkpoint swapped for one carrying pickled code is refused, naming it, and its code never runs
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    last = checkpoints / "last.ckpt"
    torch.save({"state_dict": {}, "covidcxr": Payload(), "epoch": 0}, last)
    more = recipe_from_mapping(tiny_train_recipe(tmp_path, "crashy", train={"epochs": 2}))
    with pytest.raises((CheckpointError, RunConflictError)) as refused:
        train_recipe(more, progress=False, say=lambda _: None)
    assert str(last) in str(refused.value) and "refused" in str(refused.value)
    assert not marker.exists()
