"""A hospital's PACS export as it arrives, end to end: read, split, preprocess, and no raw id anywhere.

The folder: class folders of extension-less DICOMs (one JPEG Lossless), patients known
only by their DICOM Patient ID, byte-identical copies of a file — first one filed under
the other label (an error naming the files), then only under its own label (kept with
its original on one side of the split). Every output of ``data summarize``, ``data
manifest``, ``data split`` and ``preprocess`` (files, cache names, console logs) is
searched for the raw ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import LabelConflictError
from generated_data import RAW_IDS, build_pacs_export, files_mentioning as _files_mentioning

runner = CliRunner()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pacs_export_is_read_split_by_hashed_patient_and_never_leaks_ids(tmp_path: Path) -> None:
    collection = build_pacs_export(tmp_path / "pacs_export", conflicting_copy=True)
    out = tmp_path / "out"
    out.mkdir()
    logs: list[str] = []

    # a copy filed under the other label: splitting refuses, naming the files
    refused = runner.invoke(app, ["data", "split", str(collection), "--out", str(out / "split.csv"), "--workers", "1"])
    message = refused.output + str(refused.exception)  # `covidcxr.cli.main` prints it as one red line
    logs.append(message)
    assert isinstance(refused.exception, LabelConflictError) and "different labels" in message
    assert "normal/misfiled (normal)" in message and "covid/1.2.840.0.0 (covid)" in message
    os.remove(collection / "normal" / "misfiled")

    summary = runner.invoke(app, ["data", "summarize", str(collection), "--json", "--workers", "1"])
    logs.append(summary.output)
    assert summary.exit_code == 0, summary.output
    facts = json.loads(summary.stdout)
    assert facts["images"] == 14 and facts["patients"] == 6 and facts["unreadable"] == []
    assert facts["patient_origin"] == {"dicom": 14} and facts["images_without_patient_id"] == 0
    assert facts["duplicate_groups"] == 1 and facts["duplicate_images"] == 3
    (out / "summary.json").write_text(summary.stdout)

    for command in (
        ["data", "manifest", str(collection), "--out", str(out / "manifest.csv"), "--workers", "1"],
        ["data", "split", str(collection), "--out", str(out / "split.csv"), "--test-size", "0.34", "--workers", "1"],
        ["preprocess", "--data", str(collection), "--out", str(out / "cache"), "--workers", "1", "--size", "64", "--qc-sample", "4"],
    ):
        result = runner.invoke(app, command)
        logs.append(result.output)
        assert result.exit_code == 0, result.output

    split = pd.read_csv(out / "split.csv")
    assert split["patient_id"].nunique() == 6 and split["patient_id"].str.fullmatch(r"pacs_export:[0-9a-f]{20}").all()
    assert split.groupby("patient_id")["split"].nunique().max() == 1  # patients (from hashed DICOM ids) on one side
    assert split.groupby("sha1")["split"].nunique().max() == 1  # the copies with their original
    assert (split.groupby("sha1").size() == 3).sum() == 1
    cache_index = next((out / "cache").glob("*/index.parquet"))
    assert pd.read_parquet(cache_index)["rejected_reason"].isna().all()  # the JPEG Lossless file decoded too
    (out / "console.log").write_text("\n".join(logs))

    assert _files_mentioning(out, RAW_IDS) == []  # manifest, split, summary, cache, QC, logs
    assert _files_mentioning(collection, RAW_IDS)  # (the search does find them where they are)
