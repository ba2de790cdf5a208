"""``covidcxr report``: writes the page and results.json, default paths, bad input -> exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from covidcxr.cli import app

from generated_data import make_fake_run

runner = CliRunner()


def test_report_one_run_defaults_to_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    result = runner.invoke(app, ["report", str(run_dir), "--n-boot", "100"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file() and (run_dir / "results.json").is_file()
    assert (run_dir / "report_figures" / "01-fake-roc.svg").is_file() and "report_figures" in result.output
    assert "not audited" in result.output and f"covidcxr audit {run_dir}" in result.output
    assert "Not audited" in result.output  # the verdict line says so first
    results = json.loads((run_dir / "results.json").read_text())
    # gamma is unseen and scored at random: domain shift, a warning with its own numbers (not a shortcut)
    unseen = next(f for f in results["runs"][0]["findings"] if f["id"] == "unseen_sources")
    assert unseen["severity"] == "warning" and "domain shift" in unseen["text"]
    assert results["runs"][0]["evaluation"]["n_boot"] == 100
    assert not (run_dir / "evaluation.json").exists()  # a report reads runs, it does not write into them


def test_report_several_runs_with_explicit_paths(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "a", seed=0, name="run-a")
    make_fake_run(tmp_path / "b", seed=1, name="run-b")
    out, js = tmp_path / "site" / "index.html", tmp_path / "data" / "numbers.json"
    result = runner.invoke(app, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--json", str(js), "--n-boot", "50", "--title", "A <vs> B", "--no-figure-files"])
    assert result.exit_code == 0, result.output
    assert not (out.parent / "index_figures").exists()
    html = out.read_text()
    assert "<title>A &lt;vs&gt; B</title>" in html
    assert [r["name"] for r in json.loads(js.read_text())["runs"]] == ["run-a", "run-b"]


def test_report_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "covidcxr", "report", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "r.html")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no-such-run" in proc.stderr and "Traceback" not in proc.stderr
    make_fake_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "covidcxr", "report", str(tmp_path / "run"), "--out", str(tmp_path / "r.pdf")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected an .html file" in proc.stderr
