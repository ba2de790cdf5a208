"""``covidcxr evaluate RUN --data PACS_EXPORT``: a folder of extension-less DICOMs scored, patients hashed, no raw id anywhere.

The folder (`generated_data.build_pacs_export`): covid/ and normal/ class folders of
extension-less DICOMs, 3 patients each known only by their DICOM Patient ID, one file
re-encoded as JPEG Lossless, and two byte-identical copies of one file. A tiny run trained on
phantoms (lung masks from its manifest; the U-Net for images without one) is scored on it.
Every file written (predictions, exclusions, evaluation, preprocessing cache) and the
console output are searched for the raw ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.train.recipe import recipe_from_mapping
from covidcxr.train.run import train_recipe
from generated_data import RAW_IDS, build_pacs_export, files_mentioning, tiny_train_recipe

runner = CliRunner()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_evaluate_a_run_on_a_pacs_export_hashes_patients_and_leaks_no_id(tmp_path) -> None:
    collection = build_pacs_export(tmp_path / "pacs_export", conflicting_copy=False)
    recipe = tiny_train_recipe(tmp_path, name="phantom-run", data={
        "synthetic": {"n_images": 60, "size": 64, "seed": 2},
        "task": "covid_vs_rest",
        "split": {"test_size": 0.3, "val_size": 0.25},
    }, preprocess={"cache_dir": str(tmp_path / "cache"), "size": 64, "mask_source": "auto", "lungs": "none", "workers": 1})
    run_dir = train_recipe(recipe_from_mapping(recipe), progress=False).run_dir

    result = runner.invoke(app, ["evaluate", str(run_dir), "--data", str(collection), "--name", "pacs", "--json", "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = run_dir / "external" / "pacs"
    predictions = pd.read_parquet(out / "predictions.parquet")
    # every file read and scored, the JPEG Lossless one included; nothing refused, nothing linked to the phantoms
    assert len(predictions) == 14 and report["rejected"]["n"] == 0 and report["excluded"]["n"] == 0
    assert report["per_source"]["pacs_export"]["n_images"] == 14 and report["per_source"]["pacs_export"]["n_patients"] == 6
    # patients: salted one-way hashes of the DICOM Patient ID (not the file name: covid/ and normal/ never merge)
    assert predictions["patient_id"].str.fullmatch(r"pacs_export:[0-9a-f]{20}").all()
    assert predictions["patient_id"].nunique() == 6
    assert predictions.groupby("patient_id")["label"].nunique().max() == 1
    # the byte-identical copies: one copy group, one (hashed) patient
    copies = predictions[predictions["image"].str.contains("/copies/")]
    original = predictions[predictions["image"].str.endswith("covid/1.2.840.0.0")]
    assert len(copies) == 2 and len(original) == 1
    assert set(copies["patient_id"]) == set(original["patient_id"])
    assert copies["dup_group"].nunique() == 1 and copies["dup_group"].iloc[0] == original["dup_group"].iloc[0]

    # `grep -r` of every output for the raw ids finds nothing: the run folder (external/ included),
    # the preprocessing and fingerprint caches, the console output
    (tmp_path / "console.log").write_text(result.output)
    assert files_mentioning(run_dir, RAW_IDS) == []
    assert files_mentioning(tmp_path / "cache", RAW_IDS) == []
    assert files_mentioning(Path(os.environ["COVIDCXR_CACHE_DIR"]), RAW_IDS) == []  # fingerprints (conftest puts them in tmp)
    assert not any(raw in result.output for raw in RAW_IDS)
    assert files_mentioning(collection, RAW_IDS)  # (the search does find them where they are)
