"""A hospital's own chest X-rays, in one of two simple forms, as they arrive.

(a) One folder per class: ``<root>/<label>/**/<any file>``, the folder names being labels
    (``covid``, ``pneumonia``, ``normal``, ``other``, any case; also ``COVID-19``,
    ``NORMAL``, ``PNEUMONIA``, ``healthy``...). Files are recognised by their *content*
    (PNG, JPEG, TIFF, BMP, DICOM; `covidcxr.io.sniff`), so extension-less DICOMs as PACS
    exports write them are read; anything else is rejected with the reason.
(b) ``<root>/labels.csv`` with columns ``path,label`` (paths relative to the root) and
    optionally ``patient_id``, ``view``, ``sex``, ``age``, ``mask``, ``finding``,
    ``source``. A path (image or mask) that leaves the collection — ``../x.png``, an
    absolute path, a symlink pointing outside — is an error naming the line.

**Patients**, in this order: ``<root>/patients.csv`` (columns ``path,patient_id``; in
form (a) an image it does not list is rejected rather than guessed) or the
``patient_id`` column of ``labels.csv``; else the DICOM *Patient ID*; else none — then
**each image is its own patient** (file names are never taken for patient ids: that
would make ``covid/0.dcm`` and ``normal/0.dcm`` one patient). Every id is kept only as a
salted one-way hash, ``<source>:<HMAC-SHA256 prefix>`` (`covidcxr.io.pseudonym`, salt in
``<root>/.covidcxr-salt`` or ``$COVIDCXR_PATIENT_SALT``); the raw id never reaches the
manifest, a log, a report or a cache name. The extra manifest column ``patient_origin``
says where each id came from (``patients.csv``, ``labels.csv``, ``dicom``, ``none``), and
`covidcxr.data.summary` counts it.

For DICOM files, view, sex and age not given otherwise are read from the header (never
names, dates or other identifiers); a DICOM whose header cannot be read is rejected.

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
    ManifestBuilder,
    cell,
    csv_header,
    csv_line,
    read_table,
    resolve_root,
)
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import ImageReadError, SourceLayoutError
from covidcxr.io import read_dicom_metadata
from covidcxr.io.pseudonym import SALT_FILE, SaltUnavailable, collection_salt, dicom_patient_pseudonym, pseudonymize
from covidcxr.io.sniff import sniff_file

_CSV_COLUMNS = ("path", "label")
_SUPPORTED = "PNG, JPEG, TIFF, BMP or DICOM"
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


def _dicom_header(path: Path, image_format: str | None, where: str, out: ManifestBuilder) -> dict[str, object] | None:
    """View, sex and age of a DICOM (``{}`` for other files); None, after a rejection, if unreadable."""
    if image_format != "dicom":
        return {}
    try:
        meta = read_dicom_metadata(path)
    except ImageReadError as error:
        out.reject(path, f"{where}: {error.reason}")
        return None
    return {"view": meta.view, "sex": meta.sex, "age": meta.age}


def _sniff(path: Path) -> str | None:
    """The file's image format from its bytes, None when it is no supported image or unreadable."""
    try:
        return sniff_file(path)
    except OSError:
        return None


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``root`` (already resolved)."""
    return path.resolve().is_relative_to(root)


class _Patients:
    """Turns what a collection says about patients into salted pseudonyms (see the module doc)."""

    def __init__(self, root: Path) -> None:
        try:
            self.salt = collection_salt(root)
        except SaltUnavailable as exc:
            raise SourceLayoutError(root / SALT_FILE, str(exc)) from None

    def resolve(self, path: Path, given: str | None, given_origin: str, image_format: str | None, relative: str) -> tuple[str, str]:
        """``(pseudonym, origin)`` for one image: the given id, else DICOM Patient ID, else the image itself."""
        if given is not None:
            return pseudonymize(given, self.salt), given_origin
        if image_format == "dicom":
            try:
                pseudonym = dicom_patient_pseudonym(path, self.salt)
            except ValueError:
                pseudonym = None  # the metadata read already rejected an unreadable header
            if pseudonym is not None:
                return pseudonym, "dicom"
        # No id at all: the image is its own patient, named by a pseudonym of its path
        # inside the collection (never by its file name, which repeats across folders).
        return "img-" + pseudonymize(f"image:{relative}", self.salt), "none"


@register_source
class HospitalSource(Source):
    """A hospital's own data: class folders, or a ``labels.csv``.

    Args:
        source_name: the manifest ``source`` (and patient id prefix); default: the root
            folder's sanitised name.
    """

    name = "hospital"
    description = (
        "A hospital's own data: <label>/**/<files, any name, DICOM too> (+ optional patients.csv) or "
        "labels.csv (path,label[,patient_id]). Patients from the ids given, else DICOM Patient ID "
        "(salted hash), else each image its own patient."
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
        patients = _Patients(root)
        if (root / "labels.csv").is_file():
            return self._load_csv(root, source, patients)
        return self._load_folders(root, source, patients)

    def _load_csv(self, root: Path, source: str, patients: _Patients) -> SourceTable:
        csv_path = root / "labels.csv"
        frame = read_table(csv_path, _CSV_COLUMNS, "one row per image: path,label[,patient_id]")
        given_ids = self._read_patients(root)
        out = ManifestBuilder()
        for index, row in frame.iterrows():
            where = f"labels.csv line {csv_line(index)}"
            relative = cell(row, "path")
            if relative is None:
                out.reject(where, "path is empty")
                continue
            image = _confined(root, relative, csv_path, where, "path")
            raw_label = cell(row, "label")
            label = hospital_label(raw_label)
            if label is None:
                out.reject(image, f"{where}: unknown label {raw_label!r}; expected {_EXPECTED_LABELS}")
                continue
            mask = cell(row, "mask")
            mask_path = None if mask is None else _confined(root, mask, csv_path, where, "mask")
            if mask_path is not None and not mask_path.is_file():
                out.reject(mask_path, f"{where}: mask is absent; image kept without a mask")
                mask_path = None
            image_format = _sniff(image) if image.is_file() else None
            if image.is_file() and image_format is None:
                out.reject(image, f"{where}: not an image: content is not {_SUPPORTED} (decided from the bytes)")
                continue
            header = _dicom_header(image, image_format, where, out)
            if header is None:
                continue
            given, origin = cell(row, "patient_id"), "labels.csv"
            if given is None and given_ids is not None:
                given, origin = given_ids.get(image.relative_to(root).as_posix()), "patients.csv"
            patient, origin = patients.resolve(image, given, origin, image_format, image.relative_to(root).as_posix())
            row_source = cell(row, "source")
            out.add(
                image,
                where=where,
                source=sanitize_source_name(row_source) if row_source else source,
                label=label,
                finding=cell(row, "finding") or raw_label,
                patient=patient,
                mask=mask_path,
                view=cell(row, "view") or header.get("view"),
                sex=cell(row, "sex") or header.get("sex"),
                age=cell(row, "age") or header.get("age"),
                patient_origin=origin,
            )
        return out.table()

    def _load_folders(self, root: Path, source: str, patients: _Patients) -> SourceTable:
        out = ManifestBuilder()
        given_ids = self._read_patients(root)
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = hospital_label(folder.name)
            if label is None:
                out.reject(folder, f"folder name is not a label; expected {_EXPECTED_LABELS}; its files are not loaded")
                continue
            for directory, subdirs, files in os.walk(folder):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for filename in sorted(f for f in files if not f.startswith(".")):
                    path = Path(directory) / filename
                    if not _inside(root, path):
                        out.reject(path, "a symlink pointing outside the collection; not read")
                        continue
                    image_format = _sniff(path)
                    if image_format is None:
                        out.reject(path, f"not an image: content is not {_SUPPORTED} (decided from the bytes, not the name)")
                        continue
                    relative = path.relative_to(root).as_posix()
                    given = None
                    if given_ids is not None:
                        given = given_ids.get(relative)
                        if given is None:
                            out.reject(path, f"not listed in patients.csv (as {relative!r}); its patient is unknown")
                            continue
                    header = _dicom_header(path, image_format, f"folder {folder.name}/", out)
                    if header is None:
                        continue
                    patient, origin = patients.resolve(path, given, "patients.csv", image_format, relative)
                    out.add(
                        path,
                        where=f"folder {folder.name}/",
                        source=source,
                        label=label,
                        finding=folder.name,
                        patient=patient,
                        patient_origin=origin,
                        **header,
                    )
        return out.table()

    @staticmethod
    def _read_patients(root: Path) -> dict[str, str] | None:
        """``patients.csv`` as {path relative to root: raw patient id}, or None when absent.

        The raw ids stay in memory only until `_Patients.resolve` hashes them.
        """
        path = root / "patients.csv"
        if not path.is_file():
            return None
        frame = read_table(path, ("path", "patient_id"), "path,patient_id (image path relative to the root)")
        return {
            Path(str(p).strip()).as_posix(): str(pid).strip()
            for p, pid in zip(frame["path"], frame["patient_id"])
            if not is_missing(p) and not is_missing(pid)
        }


def _confined(root: Path, relative: str, csv_path: Path, where: str, column: str) -> Path:
    """``root / relative`` if it stays inside the collection, symlinks resolved; else an error naming the line.

    Raises:
        SourceLayoutError: an absolute path, a ``..`` leading outside, or a symlink pointing
            outside the collection.
    """
    candidate = Path(relative)
    if candidate.is_absolute():
        raise SourceLayoutError(csv_path, f"{where}: column '{column}' is an absolute path; expected a path relative to the collection {root}")
    path = root / candidate
    if not path.resolve().is_relative_to(root):
        kind = "a symlink pointing" if path.is_symlink() or path.resolve() != Path(os.path.normpath(path)) else "a path leading"
        raise SourceLayoutError(csv_path, f"{where}: column '{column}' is {kind} outside the collection {root}; expected a file inside it")
    return path
