"""``covidcxr experiment run|status|table``: a tiny grid end to end; a rerun runs nothing; errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from generated_data import tiny_train_recipe

runner = CliRunner()


def _recipe(tmp_path: Path) -> Path:
    recipe = tiny_train_recipe(tmp_path, "cligrid")
    recipe["experiment"] = {
        "grid": {"sites": {"a": {"data.sources": ["site_a"]}, "bc": {"data.sources": ["site_b", "site_c"]}}},
        "n_boot": 30,
        "scales": {"tiny": {"train.epochs": 1, "experiment.n_boot": 20}},
    }
    path = tmp_path / "cligrid.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_run_status_and_table(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    db = f"sqlite:///{tmp_path / 'grid.sqlite'}"
    first = runner.invoke(app, ["experiment", "run", str(path), "--set", "scale=tiny", "--db", db, "--precision", "32"])
    assert first.exit_code == 0, first.output
    assert "this worker: 2 run(s) done, 0 failed" in first.output and "site_a(seen)" in first.output
    again = runner.invoke(app, ["experiment", "run", str(path), "--set", "scale=tiny", "--db", db, "--precision", "32"])
    assert again.exit_code == 0 and "nothing new to run: 2/2 runs done" in again.output
    status = runner.invoke(app, ["experiment", "status", str(path), "--set", "scale=tiny", "--db", db, "--json"])
    assert status.exit_code == 0, status.output
    payload = json.loads(status.stdout)
    assert payload["experiment"] == "cligrid@tiny" and payload["counts"] == {"done": 2}
    assert [r["key"] for r in payload["runs"]] == ["sites=a", "sites=bc"]
    table = runner.invoke(app, ["experiment", "table", str(path), "--set", "scale=tiny", "--db", db, "--format", "json"])
    assert table.exit_code == 0, table.output
    data = json.loads(table.stdout)
    assert data["axes"] == ["sites"] and len(data["pooled"]) == 2 and data["missing"] == []
    seen = {(c["sites"], c["test_source"]): c["seen"] for c in data["cells"]}
    assert seen[("a", "site_a")] and not seen[("a", "site_b")] and seen[("bc", "site_c")] and not seen[("bc", "site_a")]
    rich = runner.invoke(app, ["experiment", "table", str(path), "--set", "scale=tiny", "--db", db])
    assert rich.exit_code == 0 and "seen vs unseen" in rich.output and "site_b" in rich.output
    out = tmp_path / "table.md"
    markdown = runner.invoke(app, ["experiment", "table", str(path), "--set", "scale=tiny", "--db", db, "--format", "markdown", "--out", str(out)])
    assert markdown.exit_code == 0 and out.read_text().count("\n| a |") == 2


def test_errors_name_the_problem(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    for args, words in (
        (["experiment", "run", str(path), "--set", "scale=huge"], "scale 'huge' is not defined"),
        (["experiment", "table", str(path), "--format", "xls"], "--format must be rich, markdown, csv or json"),
        (["experiment", "status", str(path), "--db", "nosuch://x"], "not a usable database URL"),
        (["experiment", "run", str(path), "--set", "experiment.grid.sites.a={data.sources: [site_a], optimizer.lr: -1}"], "recipe field 'optimizer.lr': must be > 0"),
    ):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, CovidCXRError), (args, result.output)
        assert words in str(result.exception), str(result.exception)
    # through the real entry point: one red line, exit code 2, no traceback
    result = subprocess.run([sys.executable, "-m", "covidcxr", "train", str(path), "--set", "scale=tiny"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "covidcxr experiment run" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_keep_option_sets_every_runs_output_keep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import covidcxr.experiments.runner

    class Captured(Exception):
        pass

    def fake_run(experiment, store, **kwargs):
        raise Captured([p.recipe.output.keep for p in experiment.points()])

    monkeypatch.setattr(covidcxr.experiments.runner, "run_experiment", fake_run)
    path = _recipe(tmp_path)
    db = f"sqlite:///{tmp_path / 'grid.sqlite'}"
    result = runner.invoke(app, ["experiment", "run", str(path), "--db", db, "--keep", "best"])
    assert isinstance(result.exception, Captured) and result.exception.args[0] == ["best", "best"]
    bad = runner.invoke(app, ["experiment", "run", str(path), "--db", db, "--keep", "newest"])
    assert bad.exit_code == 2 and "--keep" in bad.output
