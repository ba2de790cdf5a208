"""``covidcxr evaluate``: tables, --json for one and several runs, bad run dir -> exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from covidcxr.cli import app

from generated_data import make_fake_run

runner = CliRunner()


def test_evaluate_json_one_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    result = runner.invoke(app, ["evaluate", str(run_dir), "--json", "--n-boot", "100"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["per_source"]) == {"alpha", "beta", "gamma", "delta"}
    for source in ("alpha", "beta", "gamma"):
        auc = payload["per_source"][source]["auc"]
        assert auc["low"] <= auc["estimate"] <= auc["high"]
    assert payload["per_source"]["delta"]["auc"] is None
    assert payload["seen_unseen"]["gap"]["p_value"] < 0.05
    assert (run_dir / "evaluation.json").is_file()


def test_evaluate_tables_and_matrix_for_several_runs(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    import covidcxr.cli_evaluate

    # a wide console: the table's cells must not be truncated, whatever the test terminal is
    monkeypatch.setattr(covidcxr.cli_evaluate, "console", Console(width=200))
    make_fake_run(tmp_path / "a", seed=0, name="run-a")
    make_fake_run(tmp_path / "b", seed=1, name="run-b")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "a"), str(tmp_path / "b"), "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    assert "gamma (unseen)" in result.output and "DeLong" in result.output
    assert "train × test AUC" in result.output and "run-b [alpha+beta+delta]" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "a"), str(tmp_path / "b"), "--n-boot", "50", "--json"])
    payload = json.loads(result.stdout)
    assert [r["run"] for r in payload["runs"]] == ["run-a", "run-b"]
    assert payload["matrix"]["run-a [alpha+beta+delta]"]["delta"] is None
    assert 0.0 <= payload["matrix"]["run-b [alpha+beta+delta]"]["gamma"] <= 1.0


def test_evaluate_bad_run_dir_exits_2_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    proc = subprocess.run([sys.executable, "-m", "covidcxr", "evaluate", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no-such-run" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty-run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "covidcxr", "evaluate", str(tmp_path / "empty-run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "predictions.parquet" in proc.stderr
