"""Fixture builders for the source-adapter tests: tiny real-format files in a temp folder.

Every helper writes a genuinely valid file (8x8 PNG/JPEG, DICOM with the header fields the
adapters read) so the tests exercise the public layouts, not mocks of them.

Not a ``conftest.py``: other test folders import their own ``conftest`` by module name,
which a second ``conftest.py`` here would shadow. Test modules import the fixtures:
``from source_fixtures import build, rows_by_name``.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


class Builder:
    """Writes fixture files; every image gets distinct pixels so SHA-1s differ."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def _pixels(self) -> np.ndarray:
        value = next(self._counter)
        pixels = np.full((8, 8), value % 256, dtype=np.uint8)
        pixels[0, 0] = value // 256
        return pixels

    def png(self, path: Path, pixels: np.ndarray | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self._pixels() if pixels is None else pixels).save(path, format="PNG")
        return path

    def jpeg(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self._pixels()).save(path, format="JPEG")
        return path

    def csv(self, path: Path, header: Sequence[str], rows: Iterable[Sequence[object]], encoding: str = "utf-8") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding=encoding) as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    def text(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def dicom(
        self, path: Path, view: str | None = "PA", sex: str | None = "M", age: str | None = "058Y", patient_id: str | None = None
    ) -> Path:
        """An 8x8 MONOCHROME2 DICOM with ViewPosition, PatientSex, PatientAge and PatientID (default: the file stem)."""
        from covidcxr.io import write_dicom

        elements: dict[str, object] = {"PatientID": patient_id or path.stem, "Modality": "CR"}
        if view is not None:
            elements["ViewPosition"] = view
        if sex is not None:
            elements["PatientSex"] = sex
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # RSNA's real files carry ages without the unit ("51"), which pydicom flags.
            warnings.filterwarnings("ignore", message="Invalid value for VR AS")
            if age is not None:
                elements["PatientAge"] = age
            write_dicom(path, self._pixels(), "MONOCHROME2", 8, **elements)
        return path


@pytest.fixture
def build() -> Builder:
    """Writes tiny valid fixture files (PNG, JPEG, CSV, text, DICOM)."""
    return Builder()


def by_name(manifest) -> dict[str, dict]:
    """Manifest rows keyed by image file name."""
    return {Path(row["image"]).name: row for row in manifest.to_dict("records")}


@pytest.fixture
def rows_by_name():
    """Function: manifest -> {image file name: row dict}."""
    return by_name
