"""The Montgomery and Shenzhen adapters on tiny copies of the NLM tuberculosis set layouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidcxr.data.manifest import is_missing
from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources import montgomery as montgomery_module
from covidcxr.data.sources.montgomery import MontgomerySource
from covidcxr.data.sources.shenzhen import ShenzhenSource
from covidcxr.errors import SourceLayoutError
from source_fixtures import build, rows_by_name  # noqa: F401 (pytest fixtures)


def _half_mask(side: str) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=np.uint8)
    # Top half only, one lung per side, so the union differs from either half.
    if side == "left":
        mask[:4, :4] = 255
    else:
        mask[:4, 4:] = 255
    return mask


@pytest.fixture
def montgomery_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "MontgomerySet"
    for stem in ("MCUCXR_0001_0", "MCUCXR_0104_1", "MCUCXR_0105_1"):
        build.png(root / "CXR_png" / f"{stem}.png")
    for stem in ("MCUCXR_0001_0", "MCUCXR_0104_1"):
        build.png(root / "ManualMask" / "leftMask" / f"{stem}.png", _half_mask("left"))
        build.png(root / "ManualMask" / "rightMask" / f"{stem}.png", _half_mask("right"))
    # MCUCXR_0105_1 has only its left lung mask.
    build.png(root / "ManualMask" / "leftMask" / "MCUCXR_0105_1.png", _half_mask("left"))
    build.text(root / "ClinicalReadings" / "MCUCXR_0001_0.txt", "Patient's Sex: F\nPatient's Age: 040Y\nnormal\n")
    build.text(
        root / "ClinicalReadings" / "MCUCXR_0104_1.txt",
        "Patient's Sex: M\nPatient's Age: 044Y\n\nleft upper lobe cavitary lesion\n",
    )
    build.png(root / "CXR_png" / "Thumbs.png")
    return root


def test_montgomery_is_detected_and_loaded(montgomery_root: Path, rows_by_name) -> None:
    assert detect_source(montgomery_root) == "montgomery"
    table = load_source(montgomery_root)
    rows = rows_by_name(table.manifest)
    assert sorted(rows) == ["MCUCXR_0001_0.png", "MCUCXR_0104_1.png", "MCUCXR_0105_1.png"]
    normal, tb, no_mask = rows["MCUCXR_0001_0.png"], rows["MCUCXR_0104_1.png"], rows["MCUCXR_0105_1.png"]
    assert (normal["label"], normal["finding"], normal["patient_id"]) == ("normal", "normal", "montgomery:MCUCXR_0001")
    assert (normal["sex"], normal["age"], normal["view"]) == ("F", 40.0, "PA")
    assert (tb["label"], tb["finding"], tb["sex"], tb["age"]) == ("other", "tuberculosis", "M", 44.0)
    assert tb["reading"] == "left upper lobe cavitary lesion"
    assert is_missing(no_mask["sex"]) and math.isnan(no_mask["age"])
    assert is_missing(no_mask["mask"])
    rejected = {Path(r.path).name: r.reason for r in table.rejected}
    assert set(rejected) == {"MCUCXR_0105_1.png", "Thumbs.png"}
    assert "only one lung mask" in rejected["MCUCXR_0105_1.png"]


def test_montgomery_merges_both_lungs_into_one_cached_mask(montgomery_root: Path, rows_by_name) -> None:
    rows = rows_by_name(MontgomerySource().load(montgomery_root).manifest)
    mask = Path(rows["MCUCXR_0104_1.png"]["mask"])
    assert mask == montgomery_root / ".covidcxr" / "merged_masks" / "MCUCXR_0104_1.png"
    merged = np.asarray(Image.open(mask))
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[:4, :] = 255
    np.testing.assert_array_equal(merged, expected)
    # A second load reuses the merged file instead of writing it again.
    before = mask.stat().st_mtime_ns
    again = rows_by_name(MontgomerySource().load(montgomery_root).manifest)
    assert Path(again["MCUCXR_0104_1.png"]["mask"]) == mask
    assert mask.stat().st_mtime_ns == before


def test_montgomery_masks_go_to_the_user_cache_when_the_root_is_read_only(
    montgomery_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_by_name
) -> None:
    monkeypatch.setattr(montgomery_module, "_writable", lambda folder: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = rows_by_name(MontgomerySource().load(montgomery_root).manifest)
    mask = Path(rows["MCUCXR_0001_0.png"]["mask"])
    assert mask.parent.parent == tmp_path / "cache" / "covidcxr" / "montgomery_masks"
    assert mask.is_file()
    assert not (montgomery_root / ".covidcxr").exists()


def test_montgomery_without_images_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(SourceLayoutError, match="CXR_png"):
        MontgomerySource().load(tmp_path)


@pytest.fixture
def shenzhen_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "ChinaSet_AllFiles"
    for stem in ("CHNCXR_0001_0", "CHNCXR_0327_1", "CHNCXR_0328_1"):
        build.png(root / "CXR_png" / f"{stem}.png")
    build.text(root / "ClinicalReadings" / "CHNCXR_0001_0.txt", "male 45yrs\nnormal\n")
    build.text(root / "ClinicalReadings" / "CHNCXR_0327_1.txt", "female 38yrs\n\nPTB in the left upper field\n")
    build.text(root / "ClinicalReadings" / "CHNCXR_0328_1.txt", "Male  8month\nbilateral PTB\n")
    build.png(root / "mask" / "CHNCXR_0327_1_mask.png", _half_mask("left"))
    return root


def test_shenzhen_is_detected_and_loaded(shenzhen_root: Path, rows_by_name) -> None:
    assert detect_source(shenzhen_root) == "shenzhen"
    table = load_source(shenzhen_root)
    rows = rows_by_name(table.manifest)
    assert len(rows) == 3 and table.rejected == []
    normal, tb, child = rows["CHNCXR_0001_0.png"], rows["CHNCXR_0327_1.png"], rows["CHNCXR_0328_1.png"]
    assert (normal["label"], normal["patient_id"], normal["sex"], normal["age"]) == ("normal", "shenzhen:CHNCXR_0001", "M", 45.0)
    assert (tb["label"], tb["finding"], tb["sex"], tb["age"], tb["view"]) == ("other", "tuberculosis", "F", 38.0, "PA")
    assert tb["reading"] == "PTB in the left upper field"
    assert tb["mask"] == str(shenzhen_root / "mask" / "CHNCXR_0327_1_mask.png")
    assert is_missing(normal["mask"])
    assert (child["sex"], child["age"]) == ("M", pytest.approx(8 / 12))


def test_a_mixed_nlm_folder_reports_the_other_sets_images(shenzhen_root: Path, build) -> None:
    build.png(shenzhen_root / "CXR_png" / "MCUCXR_0001_0.png")
    rejected = ShenzhenSource().load(shenzhen_root).rejected
    assert len(rejected) == 1 and "source='montgomery'" in rejected[0].reason
