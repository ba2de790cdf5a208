"""The generic hospital adapter: class folders or labels.csv, and its place in detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidcxr.data.manifest import MANIFEST_COLUMNS, is_missing
from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.hospital import HospitalSource, hospital_label, sanitize_source_name
from covidcxr.errors import SourceLayoutError
from covidcxr.io.pseudonym import SALT_FILE, collection_salt, pseudonymize
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
    # Without patients.csv or a DICOM Patient ID each image is its own patient, named by a
    # salted hash of its path (never its file name); the DICOM's Patient ID is hashed.
    salt = collection_salt(folder_root)
    assert (folder_root / SALT_FILE).is_file()
    assert rows["pt001_1.png"]["patient_id"] == "st_mary_s_2021:img-" + pseudonymize("image:COVID-19/pt001_1.png", salt)
    assert rows["pt001_1.png"]["patient_id"] != rows["pt001_2.png"]["patient_id"]
    assert rows["pt003.dcm"]["patient_id"] == "st_mary_s_2021:" + pseudonymize("pt003", salt)
    assert rows["pt001_1.png"]["patient_origin"] == "none" and rows["pt003.dcm"]["patient_origin"] == "dicom"
    assert set(table.manifest["source"]) == {"st_mary_s_2021"}
    assert rows["pt002.jpg"]["finding"] == "NORMAL"
    # A DICOM's view, sex and age come from its header.
    assert (rows["pt003.dcm"]["view"], rows["pt003.dcm"]["sex"], rows["pt003.dcm"]["age"]) == ("PA", "M", 58.0)
    rejected = {Path(r.path).name: r.reason for r in table.rejected}
    assert set(rejected) == {"exports", "notes.txt", "pt005.dcm"}
    assert "not a label" in rejected["exports"]
    assert "not an image" in rejected["pt005.dcm"] and "from the bytes" in rejected["pt005.dcm"]


def test_folder_form_uses_patients_csv_and_rejects_unlisted_images(folder_root: Path, build, rows_by_name) -> None:
    build.csv(
        folder_root / "patients.csv",
        ["path", "patient_id"],
        [["COVID-19/pt001_1.png", "P1"], ["COVID-19/pt001_2.png", "P1"], ["NORMAL/2020/pt002.jpg", "P2"], ["Other/pt004.png", "P4"]],
    )
    table = HospitalSource(source_name="mary").load(folder_root)
    rows = rows_by_name(table.manifest)
    salt = collection_salt(folder_root)
    assert rows["pt001_1.png"]["patient_id"] == rows["pt001_2.png"]["patient_id"] == "mary:" + pseudonymize("P1", salt)
    assert rows["pt002.jpg"]["patient_id"] == "mary:" + pseudonymize("P2", salt)
    assert set(table.manifest["patient_origin"]) == {"patients.csv"}
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
    assert sorted(rows) == ["a.png", "b.png", "d.png", "e.png"]
    a, b, e = rows["a.png"], rows["b.png"], rows["e.png"]
    salt = collection_salt(csv_root)
    assert (a["label"], a["patient_id"], a["view"], a["sex"], a["age"]) == ("covid", "site_b:" + pseudonymize("1001", salt), "AP", "F", 71.0)
    # line 6 has no patient id and is no DICOM: its own patient
    assert rows["d.png"]["patient_origin"] == "none" and rows["d.png"]["patient_id"].startswith("site_b:img-")
    assert a["mask"] == str(csv_root / "masks" / "a.png")
    assert (b["label"], b["sex"]) == ("normal", "M")
    assert (e["source"], e["patient_id"], e["label"]) == ("site_b_icu", "site_b_icu:" + pseudonymize("1005", salt), "pneumonia")
    assert is_missing(e["mask"])


def test_csv_form_rejects_bad_rows_naming_the_line(csv_root: Path) -> None:
    reasons = {Path(r.path).name: r.reason for r in HospitalSource().load(csv_root).rejected}
    assert set(reasons) == {"c.png", "missing.png", "e.png"}
    assert "labels.csv line 4" in reasons["c.png"] and "unknown label 'flu'" in reasons["c.png"]
    assert "labels.csv line 5" in reasons["missing.png"] and "absent" in reasons["missing.png"]
    assert "labels.csv line 7" in reasons["e.png"] and "mask" in reasons["e.png"]


def test_csv_form_without_patient_id_column_makes_each_image_its_own_patient(tmp_path: Path, build) -> None:
    build.png(tmp_path / "a.png")
    build.png(tmp_path / "b.png")
    build.csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", "normal"], ["b.png", "normal"]])
    manifest = HospitalSource().load(tmp_path).manifest
    assert manifest["patient_id"].nunique() == 2 and set(manifest["patient_origin"]) == {"none"}


@pytest.mark.parametrize("bad", ["../outside.png", "ABSOLUTE", "img/link.png"])
def test_csv_paths_must_stay_inside_the_collection(tmp_path: Path, build, bad: str) -> None:
    root = tmp_path / "site"
    outside = build.png(tmp_path / "outside.png")
    build.png(root / "img" / "a.png")
    (root / "img" / "link.png").symlink_to(outside)
    path = str(outside) if bad == "ABSOLUTE" else bad
    build.csv(root / "labels.csv", ["path", "label"], [["img/a.png", "normal"], [path, "covid"]])
    with pytest.raises(SourceLayoutError, match=r"labels.csv line 3: column 'path' is .*outside the collection|line 3: column 'path' is an absolute path"):
        HospitalSource().load(root)


def test_folder_symlink_pointing_outside_is_rejected(tmp_path: Path, build) -> None:
    root = tmp_path / "site"
    build.png(root / "covid" / "a.png")
    (root / "covid" / "b.png").symlink_to(build.png(tmp_path / "elsewhere.png"))
    table = HospitalSource().load(root)
    assert [Path(p).name for p in table.manifest["image"]] == ["a.png"]
    assert "outside the collection" in {Path(r.path).name: r.reason for r in table.rejected}["b.png"]


def test_extension_less_dicoms_and_patient_ids_across_label_folders(tmp_path: Path, build) -> None:
    """covid/0 and normal/0 are different patients; a shared DICOM Patient ID links images, hashed."""
    root = tmp_path / "pacs"
    build.dicom(root / "covid" / "0")  # PatientID "0" (the fixture uses the stem)
    build.dicom(root / "normal" / "0")  # also PatientID "0": one patient, by its DICOM id
    build.png(root / "covid" / "1")
    build.png(root / "normal" / "1")  # same file name, no id: two patients
    manifest = HospitalSource().load(root).manifest
    by = {Path(i).parent.name + "/" + Path(i).name: p for i, p in zip(manifest["image"], manifest["patient_id"])}
    assert len(by) == 4  # extension-less files read by content
    assert by["covid/0"] == by["normal/0"] and by["covid/1"] != by["normal/1"]
    assert not any(p.endswith(":0") or p.endswith(":1") for p in by.values())


def test_salt_from_the_environment_and_read_only_collections(tmp_path: Path, build, monkeypatch) -> None:
    root = tmp_path / "ro"
    build.dicom(root / "covid" / "scan")
    monkeypatch.setenv("COVIDCXR_PATIENT_SALT", "x" * 32)
    manifest = HospitalSource().load(root).manifest
    assert manifest.loc[0, "patient_id"] == "ro:" + pseudonymize("scan", b"x" * 32)
    assert not (root / SALT_FILE).exists()  # the given salt is not written anywhere
    monkeypatch.delenv("COVIDCXR_PATIENT_SALT")

    def read_only(*args, **kwargs):  # as on a read-only share (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("covidcxr.io.pseudonym.os.open", read_only)
    with pytest.raises(SourceLayoutError, match="COVIDCXR_PATIENT_SALT"):
        HospitalSource().load(root)


def test_an_invalid_patient_id_never_reaches_a_warning_or_log(tmp_path: Path, build, caplog, recwarn) -> None:
    import logging

    from covidcxr.io import write_dicom

    caplog.set_level(logging.DEBUG)
    raw = "SECRET-" + "9" * 80  # longer than LO allows: pydicom would warn, quoting it
    path = tmp_path / "site" / "covid" / "scan"
    path.parent.mkdir(parents=True)
    with pytest.warns(UserWarning):
        write_dicom(path, np.full((40, 40), 7, np.uint16) + np.arange(40, dtype=np.uint16), "MONOCHROME2", 12, PatientID=raw)
    recwarn.clear()
    manifest = HospitalSource().load(tmp_path / "site").manifest
    assert manifest.loc[0, "patient_origin"] == "dicom"
    # pydicom's validation of the Patient ID (here: too long for LO) is silenced while it is read
    assert [str(w.message) for w in recwarn if "VR LO" in str(w.message) or "SECRET" in str(w.message)] == []
    assert "SECRET" not in caplog.text


def test_summary_says_which_images_have_no_patient_id(folder_root: Path) -> None:
    from covidcxr.data.summary import summarize

    summary = summarize(folder_root, check_images=False)
    assert summary["patient_origin"] == {"dicom": 1, "none": 4}
    assert summary["images_without_patient_id"] == 4 and summary["label_conflicts"] == []
