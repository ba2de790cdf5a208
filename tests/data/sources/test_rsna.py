"""The RSNA Pneumonia Detection Challenge adapter on a tiny copy of its stage 2 layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.rsna import RSNASource
from covidcxr.errors import SourceLayoutError
from source_fixtures import build  # noqa: F401 (pytest fixtures)

OPACITY = "00436515-870c-4b36-a041-de91049b9ab4"  # two boxes
NORMAL = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
NOT_NORMAL = "00313ee0-9eaa-42f4-b0ab-c148ed3241cd"
MISSING = "00322d4d-1c29-4943-afc9-b6754be640eb"
BROKEN = "003d8fa0-6bf1-40ed-b54c-ac657f8495c5"

LABEL_ROWS = [
    [NORMAL, "", "", "", "", "0"],
    [NOT_NORMAL, "", "", "", "", "0"],
    [MISSING, "", "", "", "", "0"],
    [OPACITY, "264", "152", "213", "379", "1"],
    [OPACITY, "562", "152", "256", "453", "1"],
    [BROKEN, "", "", "", "", "0"],
]
CLASS_ROWS = [
    [NORMAL, "Normal"],
    [NOT_NORMAL, "No Lung Opacity / Not Normal"],
    [MISSING, "No Lung Opacity / Not Normal"],
    [OPACITY, "Lung Opacity"],
    [OPACITY, "Lung Opacity"],
    [BROKEN, "Normal"],
]


@pytest.fixture
def rsna_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "rsna-pneumonia-detection-challenge"
    images = root / "stage_2_train_images"
    build.dicom(images / f"{OPACITY}.dcm", view="AP", sex="F", age="51")
    build.dicom(images / f"{NORMAL}.dcm", view="PA", sex="F", age="051Y")
    build.dicom(images / f"{NOT_NORMAL}.dcm", view="PA", sex="M", age="48")
    (images / f"{BROKEN}.dcm").write_bytes(b"this is not a DICOM file")
    build.csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], LABEL_ROWS)
    build.csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], CLASS_ROWS)
    return root


def _by_patient(manifest) -> dict[str, dict]:
    return {Path(row["image"]).stem: row for row in manifest.to_dict("records")}


def test_rsna_is_detected_and_loaded_one_row_per_image(rsna_root: Path) -> None:
    assert detect_source(rsna_root) == "rsna"
    table = load_source(rsna_root)
    rows = _by_patient(table.manifest)
    assert sorted(rows) == sorted([OPACITY, NORMAL, NOT_NORMAL])
    opacity = rows[OPACITY]
    assert (opacity["label"], opacity["finding"], opacity["n_boxes"]) == ("pneumonia", "Lung Opacity", 2)
    assert (opacity["view"], opacity["sex"], opacity["age"]) == ("AP", "F", 51.0)
    assert opacity["patient_id"] == f"rsna:{OPACITY}"
    assert (rows[NORMAL]["label"], rows[NORMAL]["finding"], rows[NORMAL]["age"]) == ("normal", "Normal", 51.0)
    assert (rows[NOT_NORMAL]["label"], rows[NOT_NORMAL]["finding"]) == ("other", "No Lung Opacity / Not Normal")
    assert (rows[NOT_NORMAL]["view"], rows[NOT_NORMAL]["sex"], rows[NOT_NORMAL]["n_boxes"]) == ("PA", "M", 0)


def test_rsna_rejects_absent_and_unreadable_dicoms(rsna_root: Path) -> None:
    rejected = {Path(r.path).stem: r.reason for r in RSNASource().load(rsna_root).rejected}
    assert set(rejected) == {MISSING, BROKEN}
    assert "absent" in rejected[MISSING]
    assert "stage_2_train_labels.csv line 7" in rejected[BROKEN] and "DICOM" in rejected[BROKEN]


def test_rsna_without_class_file_maps_target_0_to_normal(rsna_root: Path) -> None:
    (rsna_root / "stage_2_detailed_class_info.csv").unlink()
    rows = _by_patient(RSNASource().load(rsna_root).manifest)
    assert (rows[NOT_NORMAL]["label"], rows[NOT_NORMAL]["finding"]) == ("normal", "Target 0")
    assert rows[OPACITY]["label"] == "pneumonia"


def test_rsna_rejects_images_whose_rows_disagree(rsna_root: Path, build) -> None:
    build.csv(
        rsna_root / "stage_2_detailed_class_info.csv",
        ["patientId", "class"],
        [[NORMAL, "Lung Opacity"], [OPACITY, "Lung Opacity"]],
    )
    rejected = {Path(r.path).stem: r.reason for r in RSNASource().load(rsna_root).rejected}
    assert "contradicts" in rejected[NORMAL]
    assert "not listed in stage_2_detailed_class_info.csv" in rejected[NOT_NORMAL]


def test_rsna_labels_without_target_column_names_it(rsna_root: Path, build) -> None:
    build.csv(rsna_root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height"], [[NORMAL, "", "", "", ""]])
    with pytest.raises(SourceLayoutError, match="Target"):
        RSNASource().load(rsna_root)
