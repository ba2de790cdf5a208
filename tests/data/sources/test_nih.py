"""The NIH ChestX-ray14 adapter on a tiny copy of its Data_Entry CSV and split image folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.nih import NIHSource, nih_label
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)

HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]  # fmt: skip
ROWS = [
    ["00000001_000.png", "Cardiomegaly", "0", "1", "57", "M", "PA", "2682", "2749", "0.143", "0.143"],
    ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA", "2894", "2729", "0.143", "0.143"],
    ["00000003_000.png", "No Finding", "0", "3", "81", "F", "PA", "2582", "2991", "0.143", "0.143"],
    ["00000061_012.png", "Edema|Effusion|Infiltration|Pleural_Thickening|Pneumonia", "12", "61", "77", "M", "AP",
     "3056", "2544", "0.139", "0.139"],
    ["00000005_000.png", "No Finding", "0", "5", "69", "F", "PA", "2048", "2500", "0.168", "0.168"],
]  # fmt: skip


@pytest.fixture
def nih_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "ChestXray-NIHCC"
    # Kaggle's copy: the parts unpacked side by side; 00000005_000.png is in a part not downloaded.
    build.png(root / "images_001" / "images" / "00000001_000.png")
    build.png(root / "images_001" / "images" / "00000001_001.png")
    build.png(root / "images_001" / "images" / "00000003_000.png")
    build.png(root / "images_002" / "images" / "00000061_012.png")
    build.csv(root / "Data_Entry_2017_v2020.csv", HEADER, ROWS)
    return root


def test_nih_is_detected_and_loaded(nih_root: Path, rows_by_name) -> None:
    assert detect_source(nih_root) == "nih"
    table = load_source(nih_root)
    rows = rows_by_name(table.manifest)
    assert len(rows) == 4
    assert {name: row["label"] for name, row in rows.items()} == {
        "00000001_000.png": "other",
        "00000001_001.png": "other",
        "00000003_000.png": "normal",
        "00000061_012.png": "pneumonia",
    }
    pneumonia = rows["00000061_012.png"]
    assert pneumonia["finding"] == "Edema|Effusion|Infiltration|Pleural_Thickening|Pneumonia"
    assert (pneumonia["patient_id"], pneumonia["view"], pneumonia["sex"], pneumonia["age"]) == (
        "nih:00000061",
        "AP",
        "M",
        77.0,
    )
    assert Path(pneumonia["image"]) == nih_root / "images_002" / "images" / "00000061_012.png"
    assert rows["00000001_000.png"]["patient_id"] == rows["00000001_001.png"]["patient_id"] == "nih:00000001"
    assert (rows["00000003_000.png"]["sex"], rows["00000003_000.png"]["age"]) == ("F", 81.0)


def test_nih_reports_each_row_whose_image_is_absent(nih_root: Path) -> None:
    rejected = NIHSource().load(nih_root).rejected
    assert [Path(r.path).name for r in rejected] == ["00000005_000.png"]
    assert "Data_Entry_2017_v2020.csv line 6" in rejected[0].reason


def test_nih_reads_the_2017_csv_with_dicom_style_ages(tmp_path: Path, build) -> None:
    build.png(tmp_path / "images" / "00000001_000.png")
    build.csv(tmp_path / "Data_Entry_2017.csv", HEADER, [["00000001_000.png", "Hernia", "0", "1", "058Y", "M", "PA", "", "", "", ""]])
    table = load_source(tmp_path)
    assert table.manifest.loc[0, "age"] == 58.0
    assert table.manifest.loc[0, "label"] == "other"


def test_nih_csv_without_patient_id_names_the_column(tmp_path: Path, build) -> None:
    header = [c for c in HEADER if c != "Patient ID"]
    build.csv(tmp_path / "Data_Entry_2017.csv", header, [["00000001_000.png", "Hernia", "0", "58", "M", "PA", "", "", "", ""]])
    with pytest.raises(SourceLayoutError, match="Patient ID"):
        NIHSource().load(tmp_path)


def test_nih_label() -> None:
    assert nih_label("No Finding") == "normal"
    assert nih_label("Pneumonia") == "pneumonia"
    assert nih_label("Atelectasis|Pneumonia") == "pneumonia"
    assert nih_label("Atelectasis|Effusion") == "other"
