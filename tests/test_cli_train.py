"""``covidcxr train``: a recipe with --set overrides -> a run directory; resume; errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.train import RecipeError, RunConflictError
from generated_data import tiny_train_recipe

runner = CliRunner()


@pytest.fixture()
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_train_recipe(tmp_path, "cli")))
    return path


def test_train_writes_a_run_and_skips_it_when_finished(recipe_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "my-run"
    args = ["train", str(recipe_file), "--set", "train.epochs=1", "--set", "optimizer.lr=0.002", "--run-dir", str(run_dir), "--no-progress", "--precision", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test" in result.output and "AUC" in result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["engine"]["precision"] == "32-true" and metrics["epochs_trained"] == 1
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optimizer"]["lr"] == pytest.approx(0.002) and config["output"]["run_dir"] == str(run_dir)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "not retrained" in again.output
    other = runner.invoke(app, [*args, "--set", "optimizer.lr=0.5"])  # the last --set wins
    assert isinstance(other.exception, RunConflictError)


def test_bad_field_is_one_red_line_with_exit_code_2(recipe_file: Path) -> None:
    result = runner.invoke(app, ["train", str(recipe_file), "--set", "optimizer.lr=0"])
    assert isinstance(result.exception, RecipeError) and "optimizer.lr" in str(result.exception)
    proc = subprocess.run(
        [sys.executable, "-m", "covidcxr", "train", str(recipe_file), "--set", "train.batch_sise=4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "recipe field 'train.batch_sise': unknown field" in proc.stderr and "Traceback" not in proc.stderr


def test_tracking_and_keep_options_reach_the_recipe(recipe_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import covidcxr.train
    from covidcxr.train.run import RunResult

    seen = []

    def fake_train(recipe, **kwargs):
        seen.append(recipe)
        return RunResult(tmp_path, "trained")

    monkeypatch.setattr(covidcxr.train, "train_recipe", fake_train)
    uri = f"file:{tmp_path / 'mlruns'}"
    result = runner.invoke(app, ["train", str(recipe_file), "--tensorboard", "--mlflow", uri, "--keep", "best", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert seen[0].output.tensorboard is True and seen[0].output.mlflow == uri and seen[0].output.keep == "best"
    bad = runner.invoke(app, ["train", str(recipe_file), "--keep", "some"])
    assert isinstance(bad.exception, RecipeError) and "output.keep" in str(bad.exception)
