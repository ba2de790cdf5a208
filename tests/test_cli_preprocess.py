"""``covidcxr preprocess``: cache, QC sheet and table, summary, bad input."""

from __future__ import annotations

import json

import shutil
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data.synth import synthesize
from covidcxr.preprocess.cache import config_dir
from covidcxr.preprocess.pipeline import PreprocessConfig, PreprocessConfigError
from covidcxr.preprocess.qc import QC_COLUMNS

runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "phantoms"
    synthesize(root, n_images=12, size=64, seed=4)
    return root


@pytest.fixture()
def phantoms(phantom_source, tmp_path):
    root = tmp_path / "phantoms"
    shutil.copytree(phantom_source, root)
    return root


def test_preprocess_writes_the_cache_contact_sheet_and_qc_table(phantoms, tmp_path):
    out = tmp_path / "cache"
    args = ["preprocess", "--data", str(phantoms), "--out", str(out), "--lungs", "crop", "--size", "96",
            "--mask-source", "manifest", "--workers", "1", "--qc-sample", "6"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    directory = config_dir(out, PreprocessConfig(lungs="crop", size=96, mask_source="manifest"))
    sheet = directory / "qc" / "contact_sheet.png"
    with Image.open(sheet) as image:
        assert image.width > 3 * 96 and image.height > 6 * 96
    qc = pd.read_csv(directory / "qc" / "qc.csv")
    assert list(qc.columns) == list(QC_COLUMNS) and len(qc) == 12
    assert set(qc["cache"]) == {"miss"} and qc["mask_area_fraction"].between(0.05, 0.6).all()
    # the phantoms' exact masks: both lungs present, so the height ratio is defined and plausible
    assert qc["lung_height_ratio"].between(0.6, 1.0).all()
    assert (qc["possible_opacity_cut"] == (qc["lung_height_ratio"] < 0.8)).all()
    findings = json.loads((directory / "qc" / "findings.json").read_text())["possible_opacity_cut"]
    assert sum(v["n_images"] for v in findings["per_source_label"].values()) == 12
    assert (directory / "config.yaml").is_file() and (directory / "index.parquet").is_file()
    assert "images/s" in result.output and "computed (misses)" in result.output

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert set(pd.read_csv(directory / "qc" / "qc.csv")["cache"]) == {"hit"}


def test_preprocess_reports_unreadable_images_and_goes_on(phantoms, tmp_path):
    broken = sorted((phantoms / "images").glob("*.png"))[2]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    config = tmp_path / "pp.yaml"
    config.write_text("lungs: mask\nblur_radius: 0\nsize: [64, 80]\nmask_source: model\n")
    out = tmp_path / "cache"
    result = runner.invoke(
        app,
        ["preprocess", "--data", str(phantoms), "--out", str(out), "--config", str(config), "--mask-source", "manifest",
         "--workers", "1", "--qc-sample", "4"],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "1 rejected" in result.output and broken.name in result.output
    directory = config_dir(out, PreprocessConfig(lungs="mask", blur_radius=0, size=(64, 80), mask_source="manifest"))
    qc = pd.read_csv(directory / "qc" / "qc.csv")
    assert (qc["cache"] == "miss").sum() == 11 and qc.loc[qc["cache"] == "error", "rejected_reason"].str.contains(broken.name).all()
    assert (directory / "qc" / "contact_sheet.png").is_file()


def test_a_bad_config_field_is_named(phantoms, tmp_path):
    result = runner.invoke(app, ["preprocess", "--data", str(phantoms), "--out", str(tmp_path / "c"), "--lungs", "lungs-only"])
    assert isinstance(result.exception, PreprocessConfigError)
    assert "lungs" in str(result.exception)
    # through the real entry point: one red line and exit code 2, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "covidcxr", "preprocess", "--data", str(phantoms), "--out", str(tmp_path / "c"), "--size", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "field 'size'" in proc.stderr and "Traceback" not in proc.stderr
