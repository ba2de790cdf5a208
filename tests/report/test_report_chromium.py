"""The report renders in headless Chromium: a screenshot of the fake audited run and of a
real run trained on the shared collection (tiny: 64 px, 1 epoch, a subset of two sources)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.evaluate.cross_source import evaluate_run
from covidcxr.report import write_report
from generated_data import make_fake_run, tiny_train_recipe
from report_helpers import write_fake_audit

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2000)
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless Chromium is not installed at {CHROMIUM} (CI installs it)")


def screenshot(html: Path, png: Path, profile: Path) -> Image.Image:
    """Render ``html`` in headless Chromium at WINDOW and return the screenshot."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={png}", f"file://{html.resolve()}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return Image.open(png).convert("RGB")


def red_pixels(image: Image.Image) -> int:
    """Pixels of the shortcut banner's red (#b42318 text and border, strongly red, little green/blue)."""
    rgb = np.asarray(image).astype(int)
    return int(np.sum((rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)))


@needs_chromium
def test_fake_audited_report_renders_with_the_banner_on_top(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    evaluate_run(run_dir, n_boot=200)
    write_fake_audit(run_dir)
    paths = write_report([run_dir], tmp_path / "report.html")
    image = screenshot(paths.html, tmp_path / "shot.png", tmp_path / "profile")
    assert image.size == WINDOW
    pixels = np.asarray(image.convert("L")).astype(float)
    assert pixels.std() > 20  # not a blank page
    # the red shortcut banner is in the first screenful, above everything else
    assert red_pixels(image.crop((0, 0, WINDOW[0], 700))) > 2000


@pytest.mark.shared_data
@needs_chromium
def test_report_of_a_tiny_run_on_the_shared_collection(shared_collection: Path, tmp_path: Path) -> None:
    from covidcxr.data.manifest import write_manifest
    from covidcxr.data.sources import load_source
    from covidcxr.train import recipe_from_mapping, train_recipe

    manifest = load_source(shared_collection).manifest
    parts = []
    # COVID from Cohen, negatives borrowed from Kermany's paediatric set (recipes/small_shared.yaml, smaller)
    for (source, label), patients in {("cohen", "covid"): 36, ("cohen", "pneumonia"): 12, ("kermany", "normal"): 24, ("kermany", "pneumonia"): 24}.items():
        rows = manifest[(manifest["source"] == source) & (manifest["label"] == label)]
        parts.append(rows[rows["patient_id"].isin(rows["patient_id"].drop_duplicates().head(patients))])
    write_manifest(pd.concat(parts), tmp_path / "subset.csv")
    recipe = tiny_train_recipe(
        tmp_path, "shared-tiny",
        data={"synthetic": None, "manifest": str(tmp_path / "subset.csv"), "sources": ["cohen"], "negatives_from": ["kermany"]},
        preprocess={"cache_dir": str(tmp_path / "cache"), "size": 64, "mask_source": "model", "lungs": "none", "workers": 1},
    )
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _m: None)
    paths = write_report([result.run_dir], tmp_path / "shared.html", n_boot=300, figures=False)
    results = json.loads(paths.json.read_text())
    run = results["runs"][0]
    assert set(run["evaluation"]["per_source"]) == {"cohen", "kermany"}
    assert run["evaluation"]["per_source"]["kermany"]["auc"] is None  # negatives only
    assert {r["source"] for r in run["composition"]["rows"]} == {"cohen", "kermany"}
    assert run["audit"]["status"] == "not_audited"
    html = paths.html.read_text()
    assert "https://" not in html and "http://" not in html
    image = screenshot(paths.html, tmp_path / "shared.png", tmp_path / "profile")
    assert image.size == WINDOW and np.asarray(image.convert("L")).astype(float).std() > 20
    keep = Path(os.environ.get("COVIDCXR_KEEP_SCREENSHOT", ""))
    if keep.name:  # a person looks at the page: COVIDCXR_KEEP_SCREENSHOT=/tmp/shot.png
        shutil.copy(tmp_path / "shared.png", keep)
