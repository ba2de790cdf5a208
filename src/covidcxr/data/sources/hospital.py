"""A hospital's own chest X-rays, in one of two simple forms.

(a) One folder per class: ``<root>/<label>/**/*.{png,jpg,jpeg,dcm,tif,tiff,bmp}``, the
    folder names being labels (``covid``, ``pneumonia``, ``normal``, ``other``, any case;
    also ``COVID-19``, ``NORMAL``, ``PNEUMONIA``, ``healthy``...). Each image is its own
    patient (id = file stem) unless ``<root>/patients.csv`` (columns ``path,patient_id``,
    paths relative to the root) maps images to patients; with it, an image it does not
    list is rejected rather than guessed.
(b) ``<root>/labels.csv`` with columns ``path,label,patient_id`` (paths relative to the
    root) and optionally ``view``, ``sex``, ``age``, ``mask``, ``finding``, ``source``.

For DICOM files, view, sex and age not given otherwise are read from the header (never
the pixels, never identifiers); a DICOM whose header cannot be read is rejected.

Without real patient ids every image is its own patient, so splits are image-level and
several images of one patient can land on both sides of a split: supply patient ids.

The manifest ``source`` is the root folder's name, lower-cased and reduced to letters,
digits, ``-`` and ``_`` (``St. Mary's`` -> ``st_mary_s``), unless the constructor's
``source_name`` (or a ``source`` column) says otherwise. This adapter is the most generic
and is registered last, so it never takes a folder another adapter recognises.

Citation:
    None: cite the hospital's data as its data-use agreement says.

Download:
    Not public: the hospital's own data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from covidcxr.data.manifest import LABELS, is_missing
from covidcxr.data.sources._common import (
    IMAGE_EXTENSIONS,
    ManifestBuilder,
    cell,
    csv_header,
    csv_line,
    read_table,
    resolve_root,
)
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import ImageReadError
from covidcxr.io import read_dicom_metadata

_CSV_COLUMNS = ("path", "label", "patient_id")
_LABEL_ALIASES = {
    "covid": "covid",
    "covid-19": "covid",
    "covid19": "covid",
    "covid 19": "covid",
    "sars-cov-2": "covid",
    "pneumonia": "pneumonia",
    "viral pneumonia": "pneumonia",
    "bacterial pneumonia": "pneumonia",
    "normal": "normal",
    "healthy": "normal",
    "no finding": "normal",
    "other": "other",
    "others": "other",
}
_EXPECTED_LABELS = f"one of {list(LABELS)} (any case; also COVID-19, NORMAL, PNEUMONIA, healthy, no finding)"


def hospital_label(raw: object) -> str | None:
    """Map a folder name or label cell to a manifest label, or None if it is none.

    Example:
        >>> hospital_label("COVID-19"), hospital_label("NORMAL"), hospital_label("x-rays")
        ('covid', 'normal', None)
    """
    if is_missing(raw):
        return None
    return _LABEL_ALIASES.get(re.sub(r"[\s_]+", " ", str(raw).strip().lower()))


def sanitize_source_name(raw: str) -> str:
    """Reduce a name to lower-case letters, digits, ``-`` and ``_`` (``hospital`` if none is left)."""
    return re.sub(r"[^a-z0-9_-]+", "_", raw.strip().lower()).strip("_-") or "hospital"


def _dicom_header(path: Path, where: str, out: ManifestBuilder) -> dict[str, object] | None:
    """View, sex and age of a ``.dcm`` file (``{}`` for other files); None, after a rejection, if unreadable."""
    if path.suffix.lower() != ".dcm" or not path.is_file():
        return {}
    try:
        meta = read_dicom_metadata(path)
    except ImageReadError as error:
        out.reject(path, f"{where}: {error.reason}")
        return None
    return {"view": meta.view, "sex": meta.sex, "age": meta.age}


@register_source
class HospitalSource(Source):
    """A hospital's own data: class folders, or a ``labels.csv``.

    Args:
        source_name: the manifest ``source`` (and patient id prefix); default: the root
            folder's sanitised name.
    """

    name = "hospital"
    description = (
        "A hospital's own data: <label>/**/*.png|jpg|dcm... folders (+ optional patients.csv) or "
        "labels.csv (path,label,patient_id). Without patient ids the split is image-level."
    )
    citation = "None: cite the hospital's data as its data-use agreement says."
    url = "Not public: the hospital's own data."

    def __init__(self, source_name: str | None = None) -> None:
        self.source_name = None if source_name is None else sanitize_source_name(source_name)

    @classmethod
    def detect(cls, root: Path) -> bool:
        if all(column in csv_header(root / "labels.csv") for column in _CSV_COLUMNS):
            return True
        return any(path.is_dir() and hospital_label(path.name) for path in root.iterdir())

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        source = self.source_name or sanitize_source_name(root.name)
        if (root / "labels.csv").is_file():
            return self._load_csv(root, source)
        return self._load_folders(root, source)

    def _load_csv(self, root: Path, source: str) -> SourceTable:
        frame = read_table(root / "labels.csv", _CSV_COLUMNS, "one row per image: path,label,patient_id")
        out = ManifestBuilder()
        for index, row in frame.iterrows():
            where = f"labels.csv line {csv_line(index)}"
            relative = cell(row, "path")
            if relative is None:
                out.reject(where, "path is empty")
                continue
            image = root / relative  # an absolute path stays absolute
            raw_label = cell(row, "label")
            label = hospital_label(raw_label)
            if label is None:
                out.reject(image, f"{where}: unknown label {raw_label!r}; expected {_EXPECTED_LABELS}")
                continue
            mask = cell(row, "mask")
            mask_path = None if mask is None else root / mask
            if mask_path is not None and not mask_path.is_file():
                out.reject(mask_path, f"{where}: mask is absent; image kept without a mask")
                mask_path = None
            header = _dicom_header(image, where, out)
            if header is None:
                continue
            row_source = cell(row, "source")
            out.add(
                image,
                where=where,
                source=sanitize_source_name(row_source) if row_source else source,
                label=label,
                finding=cell(row, "finding") or raw_label,
                patient=cell(row, "patient_id"),
                mask=mask_path,
                view=cell(row, "view") or header.get("view"),
                sex=cell(row, "sex") or header.get("sex"),
                age=cell(row, "age") or header.get("age"),
            )
        return out.table()

    def _load_folders(self, root: Path, source: str) -> SourceTable:
        out = ManifestBuilder()
        patients = self._read_patients(root)
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = hospital_label(folder.name)
            if label is None:
                out.reject(folder, f"folder name is not a label; expected {_EXPECTED_LABELS}; its files are not loaded")
                continue
            for directory, subdirs, files in os.walk(folder):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for filename in sorted(f for f in files if not f.startswith(".")):
                    path = Path(directory) / filename
                    if path.suffix.lower() not in IMAGE_EXTENSIONS:
                        out.reject(path, f"not an image file; expected one of {sorted(IMAGE_EXTENSIONS)}")
                        continue
                    relative = path.relative_to(root).as_posix()
                    if patients is None:
                        patient: str | None = path.stem
                    else:
                        patient = patients.get(relative)
                        if patient is None:
                            out.reject(path, f"not listed in patients.csv (as {relative!r}); its patient is unknown")
                            continue
                    header = _dicom_header(path, f"folder {folder.name}/", out)
                    if header is None:
                        continue
                    out.add(
                        path,
                        where=f"folder {folder.name}/",
                        source=source,
                        label=label,
                        finding=folder.name,
                        patient=patient,
                        **header,
                    )
        return out.table()

    @staticmethod
    def _read_patients(root: Path) -> dict[str, str] | None:
        """``patients.csv`` as {path relative to root: patient id}, or None when absent."""
        path = root / "patients.csv"
        if not path.is_file():
            return None
        frame = read_table(path, ("path", "patient_id"), "path,patient_id (image path relative to the root)")
        return {
            Path(str(p).strip()).as_posix(): str(pid).strip()
            for p, pid in zip(frame["path"], frame["patient_id"])
            if not is_missing(p) and not is_missing(pid)
        }
