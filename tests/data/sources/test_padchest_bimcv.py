"""PadChest and BIMCV-COVID19+/- adapters on tiny copies of their CSV/TSV files and folder trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.padchest import CSV_NAME
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)

PADCHEST_HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodLabel", "Labels",
]  # fmt: skip
PADCHEST_ROWS = [
    ["a.png", "0", "20150116", "st1", "p1", "1932.0", "M", "POSTEROANTERIOR", "PA", "Physician", "['normal']"],
    ["b.png", "0", "20150116", "st1", "p1", "1932.0", "M", "LATERAL", "L", "Physician", "['normal']"],
    ["c.png", "1", "20120301", "st2", "p2", "1950.0", "F", "AP", "AP_horizontal", "RNN_model", "['pneumonia', 'infiltrates']"],
    ["d.png", "1", "20120301", "st3", "p3", "1960.0", "F", "AP", "AP", "RNN_model", "['cardiomegaly']"],
    ["e.png", "1", "20120301", "st4", "p4", "1960.0", "F", "", "COSTAL", "RNN_model", "['normal']"],
    ["f.png", "1", "20120301", "st5", "p5", "1960.0", "F", "PA", "PA", "RNN_model", "nan"],
    ["g.png", "1", "20120301", "st6", "p6", "1960.0", "F", "PA", "PA", "RNN_model", "['exclude']"],
]  # fmt: skip


@pytest.fixture
def padchest_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "padchest"
    for row in PADCHEST_ROWS:
        build.png(root / row[1] / row[0])
    build.csv(root / CSV_NAME, PADCHEST_HEADER, PADCHEST_ROWS)
    return root


def test_padchest_counts_labels_patients_views(padchest_root: Path, rows_by_name) -> None:
    assert detect_source(padchest_root) == "padchest"
    table = load_source(padchest_root)
    rows = rows_by_name(table.manifest)
    assert {n: r["label"] for n, r in rows.items()} == {"a.png": "normal", "b.png": "normal", "c.png": "pneumonia", "d.png": "other"}
    assert table.manifest["patient_id"].nunique() == 3
    assert [rows[n]["view"] for n in ("a.png", "b.png", "c.png", "d.png")] == ["PA", "lateral", "AP Supine", "AP"]
    assert (rows["a.png"]["age"], rows["a.png"]["sex"], rows["c.png"]["finding"]) == (83.0, "M", "pneumonia|infiltrates")
    reasons = {Path(r.path).name: r.reason for r in table.rejected}
    assert set(reasons) == {"e.png", "f.png", "g.png"}
    assert "COSTAL" in reasons["e.png"] and "not a list" in reasons["f.png"] and "not assessable" in reasons["g.png"]


def _bimcv_tree(root: Path, build, labels_name: str, rows: list[tuple[str, str, str]], images: list[str]) -> Path:
    for name in images:
        subject, session = name.split("_")[:2]
        build.png(root / subject / session / "mod-rx" / name)
    lines = ["ReportID\tPatientID\tLabels"] + [f"{r}\t{p}\t{labels}" for r, p, labels in rows]
    build.text(root / "derivatives" / "labels" / labels_name, "\n".join(lines) + "\n")
    build.text(root / "participants.tsv", "participant\tmodality_dicom\tage\tgender\nsub-S1\t['CR']\t67\tM\nsub-S2\t['DX']\t45\tF\n")
    return root


@pytest.fixture
def bimcv_positive(tmp_path: Path, build) -> Path:
    return _bimcv_tree(
        tmp_path / "bimcv_pos",
        build,
        "labels_covid19_posi.tsv",
        [("ses-E1", "sub-S1", "['COVID 19', 'pneumonia']"), ("ses-E2", "sub-S1", "['normal']"), ("ses-E3", "sub-S2", "['unknown'")],
        [
            "sub-S1_ses-E1_run-1_bp-chest_vp-ap_cr.png",
            "sub-S1_ses-E1_run-2_bp-chest_vp-ll_cr.png",
            "sub-S1_ses-E2_run-1_bp-chest_vp-pa_dx.png",
            "sub-S2_ses-E3_run-1_bp-chest_vp-pa_dx.png",  # Labels cell is not a list
            "sub-S2_ses-E4_run-1_bp-chest_vp-pa_dx.png",  # session without a label row
        ],
    )


def test_bimcv_positive_set_counts_labels_patients_views(bimcv_positive: Path, rows_by_name) -> None:
    assert detect_source(bimcv_positive) == "bimcv"
    table = load_source(bimcv_positive)
    rows = rows_by_name(table.manifest)
    assert len(rows) == 3 and set(table.manifest["label"]) == {"covid"}
    assert set(table.manifest["patient_id"]) == {"bimcv:sub-S1"} and set(table.manifest["subset"]) == {"covid19_posi"}
    assert sorted(table.manifest["view"]) == ["AP", "PA", "lateral"]
    assert (rows["sub-S1_ses-E1_run-1_bp-chest_vp-ap_cr.png"]["sex"], rows["sub-S1_ses-E1_run-1_bp-chest_vp-ap_cr.png"]["age"]) == ("M", 67.0)
    reasons = sorted(r.reason for r in table.rejected)
    assert len(reasons) == 2 and any("not a list" in r for r in reasons) and any("no row" in r for r in reasons)
    radiologic = load_source(bimcv_positive, "bimcv", covid_labels="radiologic").manifest
    assert radiologic["label"].value_counts().to_dict() == {"covid": 2, "normal": 1}


def test_bimcv_negative_set_is_never_covid(tmp_path: Path, build) -> None:
    root = _bimcv_tree(
        tmp_path / "bimcv_neg",
        build,
        "labels_covid19_neg.tsv",
        [("ses-E1", "sub-S1", "['normal']"), ("ses-E2", "sub-S2", "['pneumonia']"), ("ses-E3", "sub-S2", "['COVID 19']")],
        ["sub-S1_ses-E1_run-1_bp-chest_vp-pa_cr.png", "sub-S2_ses-E2_run-1_bp-chest_vp-ap_dx.png", "sub-S2_ses-E3_run-1_bp-chest_vp-ap_dx.png"],
    )
    manifest = load_source(root).manifest
    assert manifest["label"].tolist() == ["normal", "pneumonia", "other"]
    assert manifest["patient_id"].nunique() == 2 and set(manifest["subset"]) == {"covid19_neg"}
