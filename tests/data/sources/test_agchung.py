"""The Actualmed and Figure1 adapters on tiny copies of the agchung/ repositories' layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.manifest import is_missing
from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.actualmed import ActualmedSource
from covidcxr.data.sources.figure1 import Figure1Source
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)

# The real headers of the two metadata.csv files.
ACTUALMED_HEADER = [
    "patientid", "offset", "sex", "age", "finding", "survival", "temperature", "pO2 saturation",
    "view", "modality", "imagename", "artifacts/distortion", "notes",
]  # fmt: skip
FIGURE1_HEADER = [
    "patientid", "offset", "sex", "age", "finding", "survival", "temperature", "pO2 saturation",
    "view", "modality", "artifacts/distortion", "notes",
]  # fmt: skip

COVID_IMG = "CR.1.2.840.113564.1722810170.20200318082923328940.1003000225002.png"
NEG_IMG = "CR.1.2.840.113564.1722810170.20200317090830828260.1003000225002.png"
INCONCLUSIVE_IMG = "CR.1.2.840.113564.1722810170.20200313090023421700.1003000225002.png"
MISSING_IMG = "DX.1.2.840.113564.1722810162.20200320112920531100.1203801020003.png"


def _actualmed_row(pid, finding, view, imagename, notes):
    return [pid, "", "", "", finding, "", "", "", view, "X-ray", imagename, "", notes]


@pytest.fixture
def actualmed_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "Actualmed-COVID-chestxray-dataset"
    for name in (COVID_IMG, NEG_IMG, INCONCLUSIVE_IMG):
        build.png(root / "images" / name)
    build.csv(
        root / "metadata.csv",
        ACTUALMED_HEADER,
        [
            _actualmed_row("ANON196", "COVID-19", "PA", COVID_IMG, ", date taken (YYYYMMDD): 20200318"),
            _actualmed_row("ANON56", "No finding", "AP", NEG_IMG, "Negative (covid-19 viral infection is excluded)"),
            _actualmed_row("ANON196", "", "PA", INCONCLUSIVE_IMG, "Inconclusive, date taken (YYYYMMDD): 20200313"),
            _actualmed_row("ANON86", "No finding", "PA", MISSING_IMG, "Negative"),
        ],
    )
    return root


def test_actualmed_is_detected_and_loaded(actualmed_root: Path, rows_by_name) -> None:
    assert detect_source(actualmed_root) == "actualmed"
    table = load_source(actualmed_root)
    rows = rows_by_name(table.manifest)
    assert len(rows) == 3
    assert (rows[COVID_IMG]["label"], rows[COVID_IMG]["patient_id"], rows[COVID_IMG]["view"]) == (
        "covid",
        "actualmed:ANON196",
        "PA",
    )
    assert (rows[NEG_IMG]["label"], rows[NEG_IMG]["finding"], rows[NEG_IMG]["view"]) == ("normal", "No finding", "AP")
    assert rows[INCONCLUSIVE_IMG]["label"] == "other"
    assert rows[INCONCLUSIVE_IMG]["finding"] == "unconfirmed (finding blank in source)"
    assert rows[INCONCLUSIVE_IMG]["patient_id"] == "actualmed:ANON196"
    assert is_missing(rows[COVID_IMG]["sex"]) and is_missing(rows[COVID_IMG]["age"])
    assert [Path(r.path).name for r in table.rejected] == [MISSING_IMG]
    assert "metadata.csv line 5" in table.rejected[0].reason


def test_actualmed_without_imagename_column_names_it(tmp_path: Path, build) -> None:
    build.png(tmp_path / "images" / "a.png")
    header = [c for c in ACTUALMED_HEADER if c != "imagename"]
    build.csv(tmp_path / "metadata.csv", header, [["ANON1", "", "", "", "COVID-19", "", "", "", "PA", "X-ray", "", ""]])
    with pytest.raises(SourceLayoutError, match="imagename"):
        ActualmedSource().load(tmp_path)


@pytest.fixture
def figure1_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "Figure1-COVID-chestxray-dataset"
    for name in ("COVID-00001.jpg", "COVID-00003a.jpg", "COVID-00003b.jpg", "COVID-00010.png", "COVID-00011.jpg", "COVID-00020.jpg"):
        (build.png if name.endswith(".png") else build.jpeg)(root / "images" / name)
    rows = [
        ["COVID-00001", "", "M", "33", "COVID-19", "", "", "", "AP erect", "X-ray", "", ""],
        ["COVID-00003a", "", "M", "28", "", "", "", "", "AP", "X-ray", "", "Possible tuberculosis, réévalué"],
        ["COVID-00003b", "", "M", "28", "", "", "", "", "AP", "X-ray", "", ""],
        ["COVID-00010", "", "F", "57", "Pneumonia", "", "", "", "PA", "X-ray", "", ""],
        ["COVID-00011", "", "", "", "No finding", "", "", "", "", "X-ray", "", ""],
        ["COVID-00020", "", "F", "60", "COVID-19", "", "", "", "L", "X-ray", "", ""],
        ["COVID-00030", "", "M", "70", "COVID-19", "", "", "", "PA", "X-ray", "", ""],
    ]
    # The published CSV is ISO-8859-1, not UTF-8.
    build.csv(root / "metadata.csv", FIGURE1_HEADER, rows, encoding="latin-1")
    return root


def test_figure1_is_detected_and_loaded(figure1_root: Path, rows_by_name) -> None:
    assert detect_source(figure1_root) == "figure1"
    table = load_source(figure1_root)
    rows = rows_by_name(table.manifest)
    # The lateral COVID-00020 is outside the inclusion criteria; COVID-00030 has no image.
    assert sorted(rows) == ["COVID-00001.jpg", "COVID-00003a.jpg", "COVID-00003b.jpg", "COVID-00010.png", "COVID-00011.jpg"]
    first = rows["COVID-00001.jpg"]
    assert (first["label"], first["view"], first["sex"], first["age"]) == ("covid", "AP", "M", 33.0)
    assert first["patient_id"] == "figure1:COVID-00001"
    for name in ("COVID-00003a.jpg", "COVID-00003b.jpg"):
        assert rows[name]["patient_id"] == "figure1:COVID-00003"
        assert rows[name]["label"] == "other"
        assert rows[name]["finding"] == "unconfirmed (finding blank in source)"
    assert rows["COVID-00010.png"]["label"] == "pneumonia"
    assert (rows["COVID-00011.jpg"]["label"], rows["COVID-00011.jpg"]["view"]) == ("normal", "unknown")
    assert len(table.rejected) == 1
    assert "COVID-00030" in table.rejected[0].path and "absent" in table.rejected[0].reason


def test_figure1_without_finding_column_names_it(tmp_path: Path, build) -> None:
    build.jpeg(tmp_path / "images" / "COVID-00001.jpg")
    header = [c for c in FIGURE1_HEADER if c != "finding"]
    build.csv(tmp_path / "metadata.csv", header, [["COVID-00001"] + [""] * (len(header) - 1)])
    with pytest.raises(SourceLayoutError, match="finding"):
        Figure1Source().load(tmp_path)
