"""Helpers the source adapters share: reading a layout's CSV, building rows, rejecting items.

Private to ``covidcxr.data.sources``. Each adapter describes its dataset; this module holds
the mechanics every adapter needs the same way (absolute paths, SHA-1, prefixed patient
ids, one row per image, a `Rejection` instead of a silent drop).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.data.manifest import file_sha1, is_missing, make_manifest, normalize_patient_id
from covidcxr.data.sources.base import Rejection, SourceTable, require_columns, require_file
from covidcxr.errors import SourceLayoutError


# The fingerprint cache adapters take SHA-1s from (`sha1_cache`); None: every file is hashed.
_SHA1_CACHE: ContextVar[Any] = ContextVar("covidcxr_sha1_cache", default=None)


@contextmanager
def sha1_cache(cache: Any) -> Iterator[None]:
    """Within the block, adapters take each image's SHA-1 from ``cache`` (a `covidcxr.data.dedup.FingerprintCache`).

    An unchanged file (same path, size, mtime) is not read again: at 100k images, hashing
    every byte is most of the cost of loading a layout. ``None`` leaves hashing as it is.

    Example:
        >>> with sha1_cache(FingerprintCache(default_fingerprint_cache())):  # doctest: +SKIP
        ...     table = load_source("CheXpert-v1.0-small")
    """
    token = _SHA1_CACHE.set(cache)
    try:
        yield
    finally:
        _SHA1_CACHE.reset(token)
        if cache is not None:
            cache.flush()


def _sha1(path: Path) -> str:
    cache = _SHA1_CACHE.get()
    return file_sha1(path) if cache is None else cache.sha1(path)


def resolve_root(root: str | Path) -> Path:
    """The layout's root as an absolute path, so every manifest path is absolute."""
    return Path(root).expanduser().resolve()


def csv_header(path: Path) -> list[str]:
    """The stripped column names of a CSV's first line, or ``[]`` if it is absent (for `detect`)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        row = next(csv.reader(handle), [])
    return [column.strip() for column in row]


def read_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """Read a layout's CSV with every cell as text, checking it exists and has ``columns``.

    Cells are read as strings and blanks stay ``""`` so ids such as ``00000061`` and texts
    such as ``NA`` are kept verbatim. Files that are not UTF-8 are read as Latin-1 (Figure1's
    metadata.csv is ISO-8859-1).

    Args:
        path: the CSV.
        columns: the columns the adapter needs.
        what: what the file should hold, for the error when it is missing.

    Raises:
        SourceLayoutError: naming the file when it is missing, unreadable or lacks a column.
    """
    require_file(path, what)
    frame = None
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise SourceLayoutError(path, f"is not a readable CSV ({error}); expected {what}") from None
    if frame is None:  # pragma: no cover - latin-1 decodes any byte sequence
        raise SourceLayoutError(path, f"has an unknown text encoding; expected {what}")
    frame.columns = [str(column).strip() for column in frame.columns]
    require_columns(frame, columns, path)
    return frame


def csv_line(index: int) -> int:
    """The file line of data row ``index`` (0-based), the header being line 1."""
    return index + 2


def cell(row: pd.Series, column: str) -> str | None:
    """A row's stripped text in ``column``, or None when the column is absent or blank."""
    if column not in row.index:
        return None
    value = row[column]
    return None if is_missing(value) else str(value).strip()


class ManifestBuilder:
    """Collects an adapter's rows and rejections and turns them into a `SourceTable`.

    It enforces what every adapter owes the manifest: the image exists, it is listed once,
    the patient id is non-empty and source-prefixed, paths are absolute, ``sha1`` is the
    file's. Anything that fails becomes a `Rejection` with the reason, never a silent drop.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []
        self.rejected: list[Rejection] = []
        self._listed_by: dict[str, str] = {}

    def reject(self, path: str | Path, reason: str) -> None:
        """Record an item the adapter could not use, and why."""
        self.rejected.append(Rejection(str(path), reason))

    def add(
        self,
        image: Path,
        *,
        where: str,
        source: str,
        label: str,
        patient: object,
        finding: str | None = None,
        mask: Path | None = None,
        **extra: object,
    ) -> bool:
        """Add one image; reject it (and return False) if it cannot be used.

        Args:
            image: absolute path of the image file.
            where: where the item was listed (``"metadata.csv line 7"``, a folder), for reasons.
            source: the manifest ``source`` (also the patient id prefix).
            label: one of `covidcxr.data.manifest.LABELS`.
            patient: the source's own patient id (prefixed here).
            finding: the source's text for the finding, verbatim.
            mask: absolute path of the lung mask, if any (must exist).
            **extra: view, sex, age and any extra columns.
        """
        key = str(image)
        if key in self._listed_by:
            self.reject(image, f"listed again in {where}; already listed in {self._listed_by[key]}")
            return False
        if not image.is_file():
            self.reject(image, f"listed in {where} but the file is absent")
            return False
        if is_missing(patient):
            self.reject(image, f"listed in {where} with an empty patient id")
            return False
        self._listed_by[key] = where
        self.rows.append(
            {
                "image": key,
                "mask": None if mask is None else str(mask),
                "source": source,
                "label": label,
                "finding": finding,
                "patient_id": normalize_patient_id(source, patient),
                "sha1": _sha1(image),
                **extra,
            }
        )
        return True

    def table(self) -> SourceTable:
        """The manifest (validated by `make_manifest`) and the rejections."""
        return SourceTable(make_manifest(self.rows), self.rejected)
