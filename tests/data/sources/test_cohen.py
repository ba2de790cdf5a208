"""The Cohen adapter on a tiny copy of ieee8023/covid-chestxray-dataset's real layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from covidcxr.data.manifest import is_missing
from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.cohen import CohenSource, cohen_label
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)

# The metadata.csv header of the current ieee8023 repository.
HEADER = [
    "patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
    "intubation_present", "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature",
    "pO2_saturation", "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality",
    "date", "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
]  # fmt: skip


def _row(patient, sex, age, finding, view, modality, folder, filename, license_=""):
    values = dict.fromkeys(HEADER, "")
    values.update(patientid=patient, sex=sex, age=age, finding=finding, view=view, modality=modality,
                  folder=folder, filename=filename, license=license_, date="2020")  # fmt: skip
    return [values[c] for c in HEADER]


ROWS = [
    # patient, sex, age, finding, view, modality, folder, filename, on disk?
    ("2", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "auntminnie-a-2020_01_28.jpeg", True),
    ("2", "M", "65", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "auntminnie-a-lateral.jpeg", True),
    ("17", "M", "54", "COVID-19", "AP Supine", "X-ray", "images", "jkms-35-e79-g001-l-a.jpg", True),
    ("17", "M", "54", "COVID-19", "Axial", "CT", "volumes", "jkms-35-e79-g001-l-d.jpg", True),
    ("31", "F", "", "Pneumonia/Bacterial/Streptococcus", "AP supine", "X-ray", "images", "streptococcus-1.jpg", True),
    ("3", "M", "74", "SARS", "PA", "X-ray", "images", "SARS-Fig8a-day0.jpeg", True),
    ("112", "", "", "No Finding", "PA", "X-ray", "images", "normal-1.png", True),
    ("5", "", "", "ARDS", "AP", "X-ray", "images", "ARDSSevere.png", True),
    ("200", "F", "30", "Tuberculosis", "PA", "X-ray", "images", "tb-1.jpg", True),
    ("201", "M", "40", "COVID-19, ARDS", "AP", "X-ray", "images", "covid-ards.jpg", True),
    ("202", "M", "40", "todo", "PA", "X-ray", "images", "todo-1.jpg", True),
    ("203", "F", "50", "COVID-19", "PA", "X-ray", "images", "not-in-snapshot.jpg", False),
]


@pytest.fixture
def cohen_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "covid-chestxray-dataset"
    for *_, folder, filename, present in ROWS:
        if present:
            build.jpeg(root / folder / filename)
    build.csv(root / "metadata.csv", HEADER, [_row(*r[:8], license_="CC BY 4.0") for r in ROWS])
    return root


def test_cohen_layout_is_detected_and_loaded_by_name(cohen_root: Path) -> None:
    assert detect_source(cohen_root) == "cohen"
    assert load_source(cohen_root).manifest["source"].unique().tolist() == ["cohen"]


def test_cohen_keeps_frontal_xrays_and_maps_findings(cohen_root: Path, rows_by_name) -> None:
    table = CohenSource().load(cohen_root)
    rows = rows_by_name(table.manifest)
    # 12 rows: lateral and CT excluded (criteria), todo and absent file rejected.
    assert len(rows) == 8
    assert "auntminnie-a-lateral.jpeg" not in rows and "jkms-35-e79-g001-l-d.jpg" not in rows
    labels = {name: row["label"] for name, row in rows.items()}
    assert labels == {
        "auntminnie-a-2020_01_28.jpeg": "covid",
        "jkms-35-e79-g001-l-a.jpg": "covid",
        "streptococcus-1.jpg": "pneumonia",
        "SARS-Fig8a-day0.jpeg": "pneumonia",
        "normal-1.png": "normal",
        "ARDSSevere.png": "other",
        "tb-1.jpg": "other",
        "covid-ards.jpg": "covid",
    }
    first = rows["auntminnie-a-2020_01_28.jpeg"]
    assert first["patient_id"] == "cohen:2"
    assert (first["view"], first["sex"], first["age"]) == ("PA", "M", 65.0)
    assert first["finding"] == "Pneumonia/Viral/COVID-19"
    assert first["license"] == "CC BY 4.0"
    assert Path(first["image"]).is_absolute() and Path(first["image"]).is_file()
    assert len(first["sha1"]) == 40
    assert rows["jkms-35-e79-g001-l-a.jpg"]["view"] == "AP Supine"
    assert rows["streptococcus-1.jpg"]["view"] == "AP Supine"
    assert math.isnan(rows["streptococcus-1.jpg"]["age"])
    assert is_missing(rows["normal-1.png"]["sex"])


def test_cohen_rejects_todo_and_absent_images_with_reasons(cohen_root: Path) -> None:
    rejected = {Path(r.path).name: r.reason for r in CohenSource().load(cohen_root).rejected}
    assert set(rejected) == {"todo-1.jpg", "not-in-snapshot.jpg"}
    assert "finding is 'todo'" in rejected["todo-1.jpg"]
    assert "metadata.csv line 13" in rejected["not-in-snapshot.jpg"]
    assert "absent" in rejected["not-in-snapshot.jpg"]


@pytest.mark.parametrize(
    ("finding", "label"),
    [
        ("COVID-19", "covid"),
        ("COVID-19, ARDS", "covid"),
        ("Pneumonia/Viral/COVID-19", "covid"),
        ("No Finding", "normal"),
        ("ARDS", "other"),
        ("Tuberculosis", "other"),
        ("SARS", "pneumonia"),
        ("Pneumonia/Viral/SARS", "pneumonia"),
        ("Pneumonia/Viral/MERS-CoV", "pneumonia"),
        ("Pneumocystis", "pneumonia"),
        ("Pneumonia/Fungal/Pneumocystis", "pneumonia"),
        ("Klebsiella", "pneumonia"),
        ("Legionella", "pneumonia"),
        ("Mycoplasma Bacterial Pneumonia", "pneumonia"),
        ("Chlamydophila", "pneumonia"),
        ("E.Coli", "pneumonia"),
        ("Varicella", "pneumonia"),
        ("Influenza", "pneumonia"),
        ("Lipoid", "pneumonia"),
        ("Pneumonia/Aspiration", "pneumonia"),
        ("Pneumonia", "pneumonia"),
        ("todo", None),
        ("Unknown", None),
        ("Fractured rib", None),
    ],
)
def test_cohen_label_mapping(finding: str, label: str | None) -> None:
    assert cohen_label(finding)[0] == label


def test_cohen_csv_without_a_needed_column_names_it(tmp_path: Path, build) -> None:
    root = tmp_path / "cohen"
    build.jpeg(root / "images" / "a.jpg")
    header = [c for c in HEADER if c != "modality"]
    build.csv(root / "metadata.csv", header, [["1"] + [""] * (len(header) - 1)])
    with pytest.raises(SourceLayoutError, match="modality"):
        CohenSource().load(root)


def test_cohen_without_metadata_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceLayoutError, match="metadata.csv"):
        CohenSource().load(tmp_path)
