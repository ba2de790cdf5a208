"""VinDr-CXR, SIIM-FISABIO-RSNA COVID-19 and COVIDx adapters on tiny copies of their layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.siim_covid import CATEGORIES
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)

VINDR_LABELS = ["Aortic enlargement", "Cardiomegaly", "Pneumonia", "Other disease", "No finding"]


@pytest.fixture
def vindr_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "vindr-cxr" / "1.0.0"
    build.dicom(root / "train" / "img1.dicom", view="PA", sex="F", age="045Y")
    build.dicom(root / "train" / "img2.dicom", view="PA", sex="M", age="060Y")
    build.dicom(root / "train" / "img3.dicom", view="PA", sex="M", age=None)
    build.dicom(root / "test" / "img9.dicom", view=None, sex="F", age="030Y")
    train = [
        ["img1", "R1", 0, 0, 1, 1, 0], ["img1", "R2", 0, 0, 1, 0, 0], ["img1", "R3", 0, 0, 0, 0, 1],  # pneumonia (2 of 3)
        ["img2", "R1", 0, 0, 0, 0, 1], ["img2", "R4", 0, 0, 0, 0, 1], ["img2", "R5", 0, 1, 0, 0, 0],  # normal (2 of 3)
        ["img3", "R1", 0, 0, 1, 0, 0], ["img3", "R2", 0, 0, 0, 0, 1], ["img3", "R3", 1, 0, 0, 0, 0],  # no majority: other
        ["img4", "R1", 0, 0, 0, 0, 1],  # file absent
    ]  # fmt: skip
    build.csv(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS], train)
    build.csv(root / "annotations" / "image_labels_test.csv", ["image_id", *VINDR_LABELS], [["img9", 0, 0, 0, 0, 1]])
    return root


def test_vindr_counts_labels_patients_views(vindr_root: Path, rows_by_name) -> None:
    assert detect_source(vindr_root) == "vindr"
    table = load_source(vindr_root)
    rows = rows_by_name(table.manifest)
    assert {n: r["label"] for n, r in rows.items()} == {"img1.dicom": "pneumonia", "img2.dicom": "normal", "img3.dicom": "other", "img9.dicom": "normal"}
    assert table.manifest["patient_id"].nunique() == 4
    assert table.manifest["view"].value_counts().to_dict() == {"PA": 3, "unknown": 1}
    assert (rows["img1.dicom"]["sex"], rows["img1.dicom"]["age"], rows["img1.dicom"]["readers"]) == ("F", 45.0, 3)
    assert rows["img9.dicom"]["vindr_split"] == "test"
    assert [Path(r.path).name for r in table.rejected] == ["img4.dicom"]
    anyone = rows_by_name(load_source(vindr_root, "vindr", readers="any").manifest)
    assert anyone["img3.dicom"]["label"] == "pneumonia"


@pytest.fixture
def siim_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "siim-covid19-detection"
    images = [("i1", "st1", "p-A"), ("i2", "st1", "p-A"), ("i3", "st2", "p-A"), ("i4", "st3", "p-B"), ("i5", "st4", "p-C")]
    for image, study, patient in images:
        build.dicom(root / "train" / study / f"se-{study}" / f"{image}.dcm", view="AP", sex="M", age="070Y", patient_id=patient)
    build.csv(
        root / "train_study_level.csv",
        ["id", *CATEGORIES],
        [["st1_study", 0, 1, 0, 0], ["st2_study", 1, 0, 0, 0], ["st3_study", 0, 0, 0, 1], ["st4_study", 0, 1, 1, 0]],
    )
    build.csv(
        root / "train_image_level.csv",
        ["id", "boxes", "label", "StudyInstanceUID"],
        [[f"{i}_image", "", "none 1 0 0 1 1", s] for i, s, _ in images] + [["i6_image", "", "none 1 0 0 1 1", "st9"]],
    )
    return root


def test_siim_covid_counts_labels_patients_views(siim_root: Path, rows_by_name) -> None:
    assert detect_source(siim_root) == "siim_covid"
    table = load_source(siim_root)
    rows = rows_by_name(table.manifest)
    assert {n: r["label"] for n, r in rows.items()} == {"i1.dcm": "covid", "i2.dcm": "covid", "i3.dcm": "normal", "i4.dcm": "pneumonia"}
    # the DICOM PatientID links st1 and st2 (one patient, two studies)
    assert table.manifest["patient_id"].nunique() == 2 and rows["i3.dcm"]["patient_id"] == "siim_covid:p-A"
    assert set(table.manifest["view"]) == {"AP"} and rows["i1.dcm"]["study_id"] == "siim_covid:st1"
    reasons = sorted(r.reason for r in table.rejected)
    assert len(reasons) == 2 and any("2 categories" in r for r in reasons) and any("st9 has no row" in r for r in reasons)
    strict = load_source(siim_root, "siim_covid", appearance={"Atypical Appearance": None})
    assert len(strict.manifest) == 3
    with pytest.raises(SourceLayoutError, match="appearance"):
        load_source(siim_root, "siim_covid", appearance={"Typical Appearance": "covid19"})


@pytest.fixture
def covidx_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "covidx"
    for split, name in [("train", "a.png"), ("train", "b.jpg"), ("train", "c.png"), ("test", "d.png")]:
        build.png(root / split / name) if name.endswith(".png") else build.jpeg(root / split / name)
    build.text(
        root / "train.txt",
        "1 a.png positive rsna\n1 b.jpg negative rsna\n7 c.png COVID-19 cohen\n8 missing.png normal cohen\n9 x.png\n",
    )
    build.text(root / "test.txt", "1 d.png pneumonia sirm\n")
    return root


def test_covidx_counts_labels_patients_views(covidx_root: Path, rows_by_name) -> None:
    assert detect_source(covidx_root) == "covidx"
    table = load_source(covidx_root)
    rows = rows_by_name(table.manifest)
    assert {n: r["label"] for n, r in rows.items()} == {"a.png": "covid", "b.jpg": "other", "c.png": "covid", "d.png": "pneumonia"}
    # patient ids are per data source: rsna/1 and sirm/1 are different people
    assert sorted(table.manifest["patient_id"].unique()) == ["covidx:cohen/7", "covidx:rsna/1", "covidx:sirm/1"]
    assert set(table.manifest["view"]) == {"unknown"} and rows["d.png"]["covidx_split"] == "test"
    reasons = sorted(r.reason for r in table.rejected)
    assert len(reasons) == 2 and any("absent" in r for r in reasons) and any("2 fields" in r for r in reasons)
    assert load_source(covidx_root, "covidx", negative="normal").manifest["label"].tolist().count("normal") == 1
