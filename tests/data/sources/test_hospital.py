"""The generic hospital adapter: class folders or labels.csv, and its place in detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.manifest import MANIFEST_COLUMNS, is_missing
from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.hospital import HospitalSource, hospital_label, sanitize_source_name
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)


@pytest.fixture
def folder_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "St. Mary's 2021"
    build.png(root / "COVID-19" / "pt001_1.png")
    build.png(root / "COVID-19" / "pt001_2.png")
    build.jpeg(root / "NORMAL" / "2020" / "pt002.jpg")
    build.dicom(root / "pneumonia" / "pt003.dcm")
    build.png(root / "Other" / "pt004.png")
    (root / "Other" / "pt005.dcm").write_bytes(b"not a DICOM file")
    build.text(root / "COVID-19" / "notes.txt", "exported from PACS")
    build.png(root / "exports" / "x.png")  # not a label folder
    build.text(root / "README.txt", "site export")
    return root


def test_folder_form_is_detected_and_loaded(folder_root: Path, rows_by_name) -> None:
    assert detect_source(folder_root) == "hospital"
    table = load_source(folder_root)
    rows = rows_by_name(table.manifest)
    assert {name: row["label"] for name, row in rows.items()} == {
        "pt001_1.png": "covid",
        "pt001_2.png": "covid",
        "pt002.jpg": "normal",
        "pt003.dcm": "pneumonia",
        "pt004.png": "other",
    }
    # Without patients.csv each image is its own patient (image-level splits).
    assert rows["pt001_1.png"]["patient_id"] == "st_mary_s_2021:pt001_1"
    assert set(table.manifest["source"]) == {"st_mary_s_2021"}
    assert rows["pt002.jpg"]["finding"] == "NORMAL"
    # A DICOM's view, sex and age come from its header.
    assert (rows["pt003.dcm"]["view"], rows["pt003.dcm"]["sex"], rows["pt003.dcm"]["age"]) == ("PA", "M", 58.0)
    rejected = {Path(r.path).name: r.reason for r in table.rejected}
    assert set(rejected) == {"exports", "notes.txt", "pt005.dcm"}
    assert "not a label" in rejected["exports"]
    assert "DICOM" in rejected["pt005.dcm"]


def test_folder_form_uses_patients_csv_and_rejects_unlisted_images(folder_root: Path, build, rows_by_name) -> None:
    build.csv(
        folder_root / "patients.csv",
        ["path", "patient_id"],
        [["COVID-19/pt001_1.png", "P1"], ["COVID-19/pt001_2.png", "P1"], ["NORMAL/2020/pt002.jpg", "P2"], ["Other/pt004.png", "P4"]],
    )
    table = HospitalSource(source_name="mary").load(folder_root)
    rows = rows_by_name(table.manifest)
    assert rows["pt001_1.png"]["patient_id"] == rows["pt001_2.png"]["patient_id"] == "mary:P1"
    assert rows["pt002.jpg"]["patient_id"] == "mary:P2"
    assert "pt003.dcm" not in rows and "pt005.dcm" not in rows
    reasons = {Path(r.path).name: r.reason for r in table.rejected}
    assert "not listed in patients.csv" in reasons["pt003.dcm"]


@pytest.fixture
def csv_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "site_b"
    build.png(root / "img" / "a.png")
    build.png(root / "img" / "b.png")
    build.png(root / "img" / "c.png")
    build.png(root / "img" / "d.png")
    build.png(root / "img" / "e.png")
    build.png(root / "masks" / "a.png")
    build.csv(
        root / "labels.csv",
        ["path", "label", "patient_id", "view", "sex", "age", "mask", "source"],
        [
            ["img/a.png", "COVID-19", "1001", "AP", "F", "71", "masks/a.png", ""],  # line 2
            ["img/b.png", "normal", "1002", "PA", "male", "34", "", ""],  # line 3
            ["img/c.png", "flu", "1003", "", "", "", "", ""],  # line 4: unknown label
            ["img/missing.png", "normal", "1004", "", "", "", "", ""],  # line 5: absent file
            ["img/d.png", "pneumonia", "", "", "", "", "", ""],  # line 6: no patient
            ["img/e.png", "Pneumonia", "1005", "", "", "", "masks/e.png", "site_b_icu"],  # line 7: absent mask
        ],
    )
    return root


def test_csv_form_is_detected_and_loaded(csv_root: Path, rows_by_name) -> None:
    assert detect_source(csv_root) == "hospital"
    table = load_source(csv_root)
    rows = rows_by_name(table.manifest)
    assert sorted(rows) == ["a.png", "b.png", "e.png"]
    a, b, e = rows["a.png"], rows["b.png"], rows["e.png"]
    assert (a["label"], a["patient_id"], a["view"], a["sex"], a["age"]) == ("covid", "site_b:1001", "AP", "F", 71.0)
    assert a["mask"] == str(csv_root / "masks" / "a.png")
    assert (b["label"], b["sex"]) == ("normal", "M")
    assert (e["source"], e["patient_id"], e["label"]) == ("site_b_icu", "site_b_icu:1005", "pneumonia")
    assert is_missing(e["mask"])


def test_csv_form_rejects_bad_rows_naming_the_line(csv_root: Path) -> None:
    reasons = {Path(r.path).name: r.reason for r in HospitalSource().load(csv_root).rejected}
    assert set(reasons) == {"c.png", "missing.png", "d.png", "e.png"}
    assert "labels.csv line 4" in reasons["c.png"] and "unknown label 'flu'" in reasons["c.png"]
    assert "labels.csv line 5" in reasons["missing.png"] and "absent" in reasons["missing.png"]
    assert "labels.csv line 6" in reasons["d.png"] and "empty patient id" in reasons["d.png"]
    assert "labels.csv line 7" in reasons["e.png"] and "mask" in reasons["e.png"]


def test_csv_form_without_patient_id_column_names_it(tmp_path: Path, build) -> None:
    build.png(tmp_path / "a.png")
    build.csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", "normal"]])
    with pytest.raises(SourceLayoutError, match="patient_id"):
        HospitalSource().load(tmp_path)


def test_a_collection_with_label_folders_is_still_a_collection(tmp_path: Path, build) -> None:
    image = build.png(tmp_path / "covid" / "a.png")
    header = list(MANIFEST_COLUMNS)
    row = dict.fromkeys(header, "")
    row.update(image="covid/a.png", source="site", label="covid", patient_id="site:1", view="PA")
    build.csv(tmp_path / "manifest.csv", header, [[row[c] for c in header]])
    assert image.is_file()
    assert detect_source(tmp_path) == "collection"


def test_an_unrecognised_folder_is_refused(tmp_path: Path, build) -> None:
    build.png(tmp_path / "scans" / "a.png")
    with pytest.raises(SourceLayoutError, match="no known layout"):
        detect_source(tmp_path)


def test_label_aliases_and_source_names() -> None:
    assert [hospital_label(x) for x in ("covid", "COVID-19", "Covid19", "NORMAL", "healthy", "PNEUMONIA", "Others")] == [
        "covid", "covid", "covid", "normal", "normal", "pneumonia", "other",
    ]  # fmt: skip
    assert hospital_label("tb") is None
    assert sanitize_source_name("St. Mary's 2021") == "st_mary_s_2021"
    assert sanitize_source_name("***") == "hospital"
