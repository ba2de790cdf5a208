"""The Kermany adapter on a tiny copy of the ChestXRay2017 / Kaggle chest_xray layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.data.sources import detect_source, load_source
from covidcxr.data.sources.kermany import KermanySource
from covidcxr.errors import SourceLayoutError
from source_fixtures import build  # noqa: F401 (pytest fixtures)

FILES = {
    "train/NORMAL/IM-0115-0001.jpeg": ("normal", "normal", "kermany:IM-0115"),
    "train/NORMAL/IM-0115-0002.jpeg": ("normal", "normal", "kermany:IM-0115"),
    "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": ("normal", "normal", "kermany:NORMAL2-IM-1427"),
    "train/PNEUMONIA/person1_bacteria_1.jpeg": ("pneumonia", "bacterial pneumonia", "kermany:person1"),
    "train/PNEUMONIA/person1_virus_6.jpeg": ("pneumonia", "viral pneumonia", "kermany:person1"),
    "val/NORMAL/NORMAL2-IM-1436-0001.jpeg": ("normal", "normal", "kermany:NORMAL2-IM-1436"),
    "test/PNEUMONIA/person100_bacteria_475.jpeg": ("pneumonia", "bacterial pneumonia", "kermany:person100"),
    "test/NORMAL/IM-0001-0001.jpeg": ("normal", "normal", "kermany:IM-0001"),
}


@pytest.fixture
def kermany_root(tmp_path: Path, build) -> Path:
    root = tmp_path / "chest_xray"
    for relative in FILES:
        build.jpeg(root / relative)
    build.jpeg(root / "train" / "PNEUMONIA" / "scan_0042.jpeg")  # fits no naming pattern
    build.jpeg(root / "test" / "NORMAL" / "person7_virus_1.jpeg")  # a pneumonia name in NORMAL
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def test_kermany_is_detected_and_loaded(kermany_root: Path) -> None:
    assert detect_source(kermany_root) == "kermany"
    table = load_source(kermany_root)
    manifest = table.manifest
    assert len(manifest) == len(FILES)
    for row in manifest.to_dict("records"):
        relative = Path(row["image"]).relative_to(kermany_root).as_posix()
        assert (row["label"], row["finding"], row["patient_id"]) == FILES[relative]
        assert row["source_split"] == relative.split("/")[0]
        assert row["view"] == "unknown"
    # The original split is kept only as a reference column, never as our split.
    assert "split" not in manifest.columns


def test_kermany_rejects_unknown_file_names(kermany_root: Path) -> None:
    rejected = {Path(r.path).name: r.reason for r in KermanySource().load(kermany_root).rejected}
    assert set(rejected) == {"scan_0042.jpeg", "person7_virus_1.jpeg"}
    assert "personN_bacteria_N.jpeg" in rejected["scan_0042.jpeg"]
    assert "test/NORMAL" in rejected["person7_virus_1.jpeg"]


def test_kermany_detects_a_test_only_copy_but_not_lower_case_class_folders(tmp_path: Path, build) -> None:
    build.jpeg(tmp_path / "a" / "test" / "NORMAL" / "IM-0001-0001.jpeg")
    (tmp_path / "a" / "test" / "PNEUMONIA").mkdir()
    assert KermanySource.detect(tmp_path / "a")
    (tmp_path / "b" / "train" / "normal").mkdir(parents=True)
    (tmp_path / "b" / "train" / "pneumonia").mkdir()
    assert not KermanySource.detect(tmp_path / "b")


def test_kermany_load_of_a_folder_without_the_layout_says_so(tmp_path: Path) -> None:
    with pytest.raises(SourceLayoutError, match="NORMAL"):
        KermanySource().load(tmp_path)
