from __future__ import annotations

import math

import pandas as pd
import pytest

from covidcxr.data.manifest import (
    MANIFEST_COLUMNS,
    file_sha1,
    make_manifest,
    normalize_age,
    normalize_patient_id,
    normalize_sex,
    normalize_view,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from covidcxr.errors import ManifestError


def _row(**overrides):
    row = {"image": "/d/a.png", "source": "site", "label": "covid", "patient_id": "site:1", "sha1": "a" * 40}
    row.update(overrides)
    return row


def test_make_manifest_orders_columns_and_fills_defaults():
    manifest = make_manifest([_row(extra="kept")])
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "extra"]
    assert manifest.loc[0, "view"] == "unknown"
    assert math.isnan(manifest.loc[0, "age"])


def test_normalizers():
    assert normalize_patient_id("kermany", " person1 ") == "kermany:person1"
    assert normalize_patient_id("nih", 12.0) == "nih:12"
    assert normalize_patient_id("cohen", "cohen:281") == "cohen:281"
    assert normalize_view("AP Supine") == "AP Supine"
    assert normalize_view("ap erect") == "AP"
    assert normalize_view("L") == "lateral"
    assert normalize_sex("female") == "F"
    assert normalize_sex("O") is None
    assert normalize_age("045Y") == 45.0
    assert normalize_age("018M") == 1.5
    assert math.isnan(normalize_age("400"))


@pytest.mark.parametrize(
    ("override", "column", "expected"),
    [
        ({"label": "covid19"}, "label", "expected one of"),
        ({"patient_id": ""}, "patient_id", "is empty"),
        ({"patient_id": "other:1"}, "patient_id", "source prefix 'site:'"),
        ({"sha1": "xyz"}, "sha1", "40 lowercase hex"),
        ({"age": -3}, "age", None),
    ],
)
def test_validator_names_row_and_column(override, column, expected):
    rows = [_row(image="/d/ok.png"), _row(**override)]
    if column == "age":
        # normalize_age turns impossible ages into missing values instead of failing
        assert math.isnan(make_manifest(rows).loc[1, "age"])
        frame = make_manifest([_row(image="/d/ok.png"), _row()])
        frame.loc[1, "age"] = 130.0
        with pytest.raises(ManifestError) as info:
            validate_manifest(frame)
    else:
        with pytest.raises(ManifestError) as info:
            make_manifest(rows)
    assert info.value.row == 1
    assert info.value.column == column
    assert "row 1" in str(info.value) and "/d/a.png" in str(info.value)
    if expected:
        assert expected in str(info.value)


def test_validator_rejects_duplicate_images_and_missing_columns():
    with pytest.raises(ManifestError, match="earlier row already lists"):
        make_manifest([_row(), _row()])
    with pytest.raises(ManifestError, match="missing columns"):
        validate_manifest(pd.DataFrame({"image": ["a"]}))


def test_check_files(tmp_path):
    manifest = make_manifest([_row(image=str(tmp_path / "absent.png"))])
    with pytest.raises(ManifestError, match="does not exist"):
        validate_manifest(manifest, check_files=True)


def test_round_trip_keeps_relative_paths(tmp_path):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"not really a png")
    manifest = make_manifest([_row(image=str(image), sha1=file_sha1(image), age="061Y", sex="m")])
    for name in ("manifest.csv", "manifest.parquet"):
        write_manifest(manifest, tmp_path / name)
        if name.endswith(".csv"):
            assert "images/a.png" in (tmp_path / name).read_text()
            assert str(tmp_path) not in (tmp_path / name).read_text()
        back = read_manifest(tmp_path / name)
        assert back.loc[0, "image"] == str(image)
        assert back.loc[0, "age"] == 61.0 and back.loc[0, "sex"] == "M"
        assert back.loc[0, "sha1"] == file_sha1(image)


def test_file_sha1_matches_known_digest(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert file_sha1(path) == "a9993e364706816aba3e25717850c26c9cd0d89d"
