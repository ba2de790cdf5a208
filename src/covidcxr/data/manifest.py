"""The manifest: one canonical table that every source adapter returns.

Like torchxrayvision's datasets, every collection in covidcxr is a table with one row per
image and the same columns, so collections can be merged, filtered and relabelled freely
and every downstream stage (splits, preprocessing, training, audit) reads one contract.

Columns (in this order):

| column       | meaning                                                                |
|--------------|------------------------------------------------------------------------|
| `image`      | absolute path of the image file (relative in files, see `read_manifest`) |
| `mask`       | absolute path of the lung mask, or missing                             |
| `source`     | the collection the image came from (``cohen``, ``kermany``, a site)     |
| `label`      | one of ``covid``, ``pneumonia``, ``normal``, ``other``                  |
| `finding`    | the source's own text for the finding (kept verbatim)                   |
| `patient_id` | ``"<source>:<id>"`` — normalised, source-prefixed, never a name         |
| `view`       | ``PA``, ``AP``, ``AP Supine``, ``lateral`` or ``unknown``               |
| `sex`        | ``M``, ``F`` or missing                                                 |
| `age`        | age in years (float) or missing                                         |
| `sha1`       | SHA-1 of the image file's bytes                                         |
| `dup_group`  | rows sharing a value are near-duplicates of each other (or missing)     |
| `split`      | ``train``/``val``/``test`` once split (optional)                        |
| `fold`       | cross-validation fold, an integer, once split (optional)                |

Extra columns a source provides (licence, original path, ...) are kept after these.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import ManifestError
from covidcxr.io.atomic import atomic_path

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "mask",
    "source",
    "label",
    "finding",
    "patient_id",
    "view",
    "sex",
    "age",
    "sha1",
    "dup_group",
)
SPLIT_COLUMNS: tuple[str, ...] = ("split", "fold")
LABELS: tuple[str, ...] = ("covid", "pneumonia", "normal", "other")
VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "lateral", "unknown")
SEXES: tuple[str, ...] = ("M", "F")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Columns holding file paths: absolute in memory, relative to the manifest's folder on disk.
PATH_COLUMNS: tuple[str, ...] = ("image", "mask", "mask_alt")

_REQUIRED_NON_EMPTY = ("image", "source", "label", "patient_id")
_STRING_COLUMNS = ("image", "mask", "source", "label", "finding", "patient_id", "view", "sex", "sha1", "dup_group")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def is_missing(value: object) -> bool:
    """True for None, NaN, pd.NA and blank strings: the manifest's one notion of "empty"."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, str) and value.strip() == ""


def normalize_patient_id(source: str, raw: object) -> str:
    """Return the canonical ``"<source>:<id>"`` patient id.

    Ids are prefixed by their source so two collections that both number patients from 1
    never share a patient by accident. An id that already carries the prefix is kept.

    Example:
        >>> normalize_patient_id("kermany", " person12 ")
        'kermany:person12'
        >>> normalize_patient_id("cohen", "cohen:281")
        'cohen:281'
    """
    if is_missing(raw):
        raise ValueError(f"empty patient id for source {source!r}")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    text = str(raw).strip()
    if text.startswith(f"{source}:"):
        return text
    return f"{source}:{text}"


_VIEW_ALIASES = {
    "pa": "PA",
    "p-a": "PA",
    "posteroanterior": "PA",
    "ap": "AP",
    "a-p": "AP",
    "ap erect": "AP",
    "anteroposterior": "AP",
    "ap supine": "AP Supine",
    "ap_supine": "AP Supine",
    "supine": "AP Supine",
    "l": "lateral",
    "ll": "lateral",
    "rl": "lateral",
    "lateral": "lateral",
    "lat": "lateral",
}


def normalize_view(raw: object) -> str:
    """Map a source's view text (``"P-A"``, ``"AP erect"``, DICOM ``LL``...) onto `VIEWS`.

    Example:
        >>> normalize_view("AP erect"), normalize_view("LL"), normalize_view(None)
        ('AP', 'lateral', 'unknown')
    """
    if is_missing(raw):
        return "unknown"
    return _VIEW_ALIASES.get(str(raw).strip().lower(), "unknown")


def normalize_sex(raw: object) -> str | None:
    """Map ``M``/``F``/``male``/``female`` (any case) to ``M``/``F``; anything else to None."""
    if is_missing(raw):
        return None
    text = str(raw).strip().upper()
    if text in ("M", "MALE"):
        return "M"
    if text in ("F", "FEMALE"):
        return "F"
    return None


def normalize_age(raw: object) -> float:
    """Return an age in years, or NaN.

    Accepts numbers, numeric strings and DICOM age strings (``"058Y"``, ``"006M"``,
    ``"010W"``, ``"003D"``). Ages outside 0–120 years are treated as missing.

    Example:
        >>> normalize_age("058Y"), normalize_age("006M"), normalize_age("n/a")
        (58.0, 0.5, nan)
    """
    if is_missing(raw):
        return float("nan")
    if isinstance(raw, (int, float, np.integer, np.floating)):
        years = float(raw)
    else:
        text = str(raw).strip().upper()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text)
        if not match:
            return float("nan")
        number, unit = float(match.group(1)), match.group(2) or "Y"
        years = number / {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}[unit]
    if not 0.0 <= years <= 120.0:
        return float("nan")
    return years


def file_sha1(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-1 of a file's bytes (the manifest's ``sha1`` column)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def make_manifest(records: Iterable[Mapping[str, object]] | pd.DataFrame) -> pd.DataFrame:
    """Build a manifest with the canonical columns, in order, and canonical dtypes.

    Missing canonical columns are added empty; extra columns are kept after them. Strings
    are stripped and empty strings become missing values. The result is validated.

    Args:
        records: rows as mappings, or a DataFrame.

    Returns:
        A DataFrame with a fresh RangeIndex, the columns of `MANIFEST_COLUMNS` first (then
        `split`/`fold` if present, then any extras).

    Example:
        >>> m = make_manifest([{"image": "/d/a.png", "source": "site", "label": "normal",
        ...                     "patient_id": "site:1", "sha1": "0" * 40}])
        >>> list(m.columns[:4]), m.loc[0, "view"]
        (['image', 'mask', 'source', 'label'], 'unknown')
    """
    frame = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    frame = frame.reset_index(drop=True)
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    for column in _STRING_COLUMNS:
        frame[column] = frame[column].map(lambda v: None if is_missing(v) else str(v).strip()).astype("object")
    frame["view"] = frame["view"].map(lambda v: v if v in VIEWS else normalize_view(v))
    frame["sex"] = frame["sex"].map(normalize_sex).astype("object")
    frame["age"] = frame["age"].map(normalize_age).astype("float64")
    if "fold" in frame.columns:
        frame["fold"] = frame["fold"].astype("Int64")
    ordered = list(MANIFEST_COLUMNS) + [c for c in SPLIT_COLUMNS if c in frame.columns]
    frame = frame[ordered + [c for c in frame.columns if c not in ordered]]
    return validate_manifest(frame)


def validate_manifest(frame: pd.DataFrame, check_files: bool = False) -> pd.DataFrame:
    """Check a manifest against the contract; raise `ManifestError` naming the first bad cell.

    Args:
        frame: the manifest.
        check_files: also check that every `image` (and non-empty `mask`) exists.

    Returns:
        ``frame`` itself, unchanged, so calls can be chained.

    Raises:
        ManifestError: with ``row`` (the index label), ``column`` and what was expected.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"missing columns {missing}; expected at least {list(MANIFEST_COLUMNS)}")
    if frame.index.has_duplicates:
        raise ManifestError("the index has duplicate labels; call reset_index(drop=True) first")

    for row, values in zip(frame.index, frame[list(MANIFEST_COLUMNS)].itertuples(index=False, name=None)):
        record = dict(zip(MANIFEST_COLUMNS, values))
        image = None if is_missing(record["image"]) else str(record["image"])
        for column in _REQUIRED_NON_EMPTY:
            if is_missing(record[column]):
                raise ManifestError("is empty; every image needs one", row, column, image)
        if record["label"] not in LABELS:
            raise ManifestError(f"is {record['label']!r}; expected one of {list(LABELS)}", row, "label", image)
        if not is_missing(record["view"]) and record["view"] not in VIEWS:
            raise ManifestError(f"is {record['view']!r}; expected one of {list(VIEWS)}", row, "view", image)
        if not is_missing(record["sex"]) and record["sex"] not in SEXES:
            raise ManifestError(f"is {record['sex']!r}; expected M, F or empty", row, "sex", image)
        age = record["age"]
        if not is_missing(age):
            try:
                age_value = float(age)
            except (TypeError, ValueError):
                raise ManifestError(f"is {age!r}; expected a number of years", row, "age", image) from None
            if not (0.0 <= age_value <= 120.0):
                raise ManifestError(f"is {age_value}; expected 0-120 years or empty", row, "age", image)
        patient = str(record["patient_id"])
        if not patient.startswith(f"{record['source']}:"):
            raise ManifestError(
                f"is {patient!r}; expected the source prefix '{record['source']}:' (see normalize_patient_id)",
                row,
                "patient_id",
                image,
            )
        if not is_missing(record["sha1"]) and not _SHA1.match(str(record["sha1"])):
            raise ManifestError(f"is {record['sha1']!r}; expected 40 lowercase hex digits", row, "sha1", image)
        if check_files:
            if not Path(str(image)).is_file():
                raise ManifestError("names a file that does not exist", row, "image", image)
            if not is_missing(record["mask"]) and not Path(str(record["mask"])).is_file():
                raise ManifestError(f"names {record['mask']}, which does not exist", row, "mask", image)

    if "split" in frame.columns:
        for row, value in frame["split"].items():
            if not is_missing(value) and value not in SPLITS:
                raise ManifestError(f"is {value!r}; expected one of {list(SPLITS)}", row, "split", frame.at[row, "image"])
    duplicated = frame["image"].duplicated(keep="first")
    if duplicated.any():
        row = frame.index[duplicated.to_numpy()][0]
        raise ManifestError("lists an image that an earlier row already lists", row, "image", frame.at[row, "image"])
    return frame


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest from CSV or Parquet; relative `image`/`mask` paths resolve against its folder.

    Raises:
        ManifestError: if a column is missing or a row breaks the contract.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype={"patient_id": str, "dup_group": str, "sha1": str}, keep_default_na=True)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{path} lacks columns {missing}; expected at least {list(MANIFEST_COLUMNS)}")
    root = path.parent.resolve()
    for column in PATH_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].map(lambda v: None if is_missing(v) else str(root / str(v)))
    return make_manifest(frame)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest atomically (CSV or Parquet by suffix), paths relative to its folder where possible."""
    path = Path(path)
    validate_manifest(frame)
    root = path.parent.resolve()
    out = frame.copy()

    def relative(value: object) -> object:
        if is_missing(value):
            return None
        candidate = Path(str(value))
        try:
            return candidate.resolve().relative_to(root).as_posix()
        except ValueError:
            return str(candidate)

    for column in PATH_COLUMNS:
        if column in out.columns:
            out[column] = out[column].map(relative)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            out.to_parquet(tmp, index=False)
        else:
            out.to_csv(tmp, index=False)
    return path
