"""CheXpert and MIMIC-CXR-JPG adapters on tiny copies of their CSVs and folder trees."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.chexpert import OBSERVATIONS, chexpert_label
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)


def _chexpert_row(path, sex, age, frontal, appa, **observed):
    return [path, sex, age, frontal, appa] + [observed.get(name.replace(" ", "_"), "") for name in OBSERVATIONS]


@pytest.fixture
def chexpert_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    rel = "CheXpert-v1.0-small/train/patient00001/study1/"
    rows = [
        _chexpert_row(rel + "view1_frontal.jpg", "Female", "68", "Frontal", "AP", Pneumonia="1.0"),
        _chexpert_row(rel + "view2_lateral.jpg", "Female", "68", "Lateral", "", Pneumonia="1.0"),
        _chexpert_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Male", "41", "Frontal", "PA", No_Finding="1.0"),
        _chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Male", "42", "Frontal", "PA", Pneumonia="-1.0", Edema="1.0"),
        _chexpert_row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Unknown", "77", "Frontal", "AP", Edema="1.0", Pneumonia="0.0"),
        _chexpert_row("CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP", Edema="yes"),
    ]
    valid = [_chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP", No_Finding="1.0")]
    for row in rows + valid:
        build.jpeg(root.joinpath(*Path(row[0]).parts[1:]))
    build.csv(root / "train.csv", header, rows)
    build.csv(root / "valid.csv", header, valid)
    return root


def test_chexpert_counts_labels_patients_views(chexpert_root: Path, rows_by_name) -> None:
    assert detect_source(chexpert_root) == "chexpert"
    table = load_source(chexpert_root)
    manifest = table.manifest
    assert len(manifest) == 5
    assert manifest["label"].value_counts().to_dict() == {"pneumonia": 2, "normal": 2, "other": 1}
    assert manifest["patient_id"].nunique() == 4 and "chexpert:patient00001" in set(manifest["patient_id"])
    assert sorted(manifest["view"]) == ["AP", "AP", "AP", "PA", "lateral"]
    assert manifest["sex"].isna().sum() == 1 and set(manifest["sex"].dropna()) == {"F", "M"}
    reasons = sorted(r.reason for r in table.rejected)
    assert len(reasons) == 2
    assert "uncertain (-1)" in reasons[0] + reasons[1] and "Edema is 'yes'" in reasons[0] + reasons[1]
    assert manifest.loc[manifest["image"].str.endswith("patient00001/study1/view1_frontal.jpg"), "study_id"].item() == "chexpert:patient00001/study1"


def test_chexpert_uncertain_policy_is_configurable(chexpert_root: Path) -> None:
    positive = load_source(chexpert_root, "chexpert", uncertain="positive").manifest
    negative = load_source(chexpert_root, "chexpert", uncertain="negative").manifest
    assert (positive["label"] == "pneumonia").sum() == 3 and (negative["label"] == "other").sum() == 2
    with pytest.raises(SourceLayoutError, match="uncertain"):
        load_source(chexpert_root, "chexpert", uncertain="maybe")


def test_chexpert_label_rules() -> None:
    assert chexpert_label({"No Finding": "1.0"}) == ("normal", "No Finding")
    assert chexpert_label({"No Finding": "-1.0"}, "reject")[0] is None
    assert chexpert_label({"Cardiomegaly": "1.0", "Pneumonia": "0.0"})[0] == "other"


@pytest.fixture
def mimic_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    images = [
        ("d1", "10000032", "50414267", "PA"),
        ("d2", "10000032", "50414267", "LATERAL"),
        ("d3", "10000032", "53189527", "AP"),
        ("d4", "11000011", "51111111", "AP"),
        ("d5", "12000012", "52222222", "PA"),  # its study has no label row
        ("d6", "13000013", "53333333", "PA"),  # its file is absent
    ]
    for dicom, subject, study, _ in images[:-1]:
        build.jpeg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    meta_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"]
    meta = "\n".join([",".join(meta_header)] + [f"{d},{s},{t},CHEST (PA AND LAT),{v},3056,2544" for d, s, t, v in images]) + "\n"
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as handle:
        handle.write(meta)
    header = ["subject_id", "study_id", *sorted(OBSERVATIONS)]
    def study(subject, study_id, **observed):
        return [subject, study_id] + [observed.get(n.replace(" ", "_"), "") for n in sorted(OBSERVATIONS)]
    build.csv(
        root / "mimic-cxr-2.0.0-chexpert.csv",
        header,
        [study("10000032", "50414267", No_Finding="1.0"), study("10000032", "53189527", Pneumonia="1.0"),
         study("11000011", "51111111", Pneumonia="-1.0"), study("13000013", "53333333", Edema="1.0")],
    )  # fmt: skip
    return root


def test_mimic_counts_labels_patients_views(mimic_root: Path, rows_by_name) -> None:
    assert detect_source(mimic_root) == "mimic"
    table = load_source(mimic_root)
    rows = rows_by_name(table.manifest)
    assert {n: r["label"] for n, r in rows.items()} == {"d1.jpg": "normal", "d2.jpg": "normal", "d3.jpg": "pneumonia"}
    assert {r["patient_id"] for r in rows.values()} == {"mimic:10000032"}
    assert [rows[n]["view"] for n in ("d1.jpg", "d2.jpg", "d3.jpg")] == ["PA", "lateral", "AP"]
    assert rows["d3.jpg"]["study_id"] == "mimic:53189527"
    reasons = {Path(r.path).name: r.reason for r in table.rejected}
    assert set(reasons) == {"d4.jpg", "d5.jpg", "d6.jpg"}
    assert "uncertain" in reasons["d4.jpg"] and "no row" in reasons["d5.jpg"] and "absent" in reasons["d6.jpg"]
    assert load_source(mimic_root, "mimic", uncertain="positive").manifest["label"].tolist().count("pneumonia") == 2
