"""Batch prediction: folders and files in, one CSV row per file out, resumable.

``covidcxr predict DIR_OR_FILES --csv out.csv`` runs the `Predictor` on every file found
(folders recursively, hidden files skipped) and reports *every* file: a prediction, or
the refusal with its code and reason (not an image, not a chest radiograph, unreadable...).
Formats are recognised from the bytes, so extension-less DICOMs are read.

**Resuming.** The CSV is rewritten atomically every `FLUSH_EVERY` files and at the end. A
rerun with the same ``--csv`` keeps the rows whose file is unchanged (same ``file_sha1``)
and whose ``run`` is the same run directory, and predicts only the others: a crash loses
at most the files since the last flush.

Columns (`CSV_COLUMNS`): ``image`` (the path as found), ``status`` (``predicted`` or
``refused``), ``probability``, ``threshold``, ``decision`` (``abstain`` when the predictor
abstained: then the probability is not to be acted on), ``model_decision`` (the class at the
threshold), ``abstain_reasons`` (codes, ``;`` separated), ``abstain_detail`` (their sentences,
`` | `` separated), ``abstention`` (``on``/``off``), ``warnings`` (codes, ``;`` separated),
``error`` (refusal code), ``detail`` (the reason), ``file_sha1``, ``run``. Rows are reused only
when ``abstention`` matches too; a CSV from before the abstention columns is re-predicted.
No DICOM identifier is ever read (`covidcxr.io.dicom`), so none can reach the CSV.

Example:
    >>> summary = predict_to_csv(Predictor.load("runs/small_shared"), [Path("scans/")], Path("out.csv"))  # doctest: +SKIP
    >>> summary  # doctest: +SKIP
    {'files': 120, 'predicted': 117, 'refused': 3, 'reused': 0, 'csv': 'out.csv'}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.data.manifest import file_sha1
from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path

CSV_COLUMNS = (
    "image", "status", "probability", "threshold", "decision", "model_decision", "abstain_reasons", "abstain_detail",
    "abstention", "warnings", "error", "detail", "file_sha1", "run",
)
#: The columns every predictions CSV has had; a CSV lacking only the newer ones is re-predicted, not refused.
_BASE_COLUMNS = ("image", "status", "probability", "threshold", "decision", "warnings", "error", "detail", "file_sha1", "run")
FLUSH_EVERY = 25


def expand_inputs(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders walked recursively (sorted; hidden files and folders skipped).

    A path that does not exist is kept: the predictor reports it as missing, like any
    unusable file.

    Example:
        >>> expand_inputs([Path("scans")])  # doctest: +SKIP
        [PosixPath('scans/a/IM0001'), PosixPath('scans/a/IM0002'), PosixPath('scans/b.png')]
    """
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        for directory, subdirs, files in os.walk(path):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            found.extend(Path(directory) / name for name in sorted(files) if not name.startswith("."))
    return found


def _read_previous(csv_path: Path, run_dir: str, abstention: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of an earlier CSV for this run and abstention setting, keyed by ``(image, file_sha1)``."""
    if not csv_path.is_file():
        return {}
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CovidCXRError(f"{csv_path}: not a readable predictions CSV ({exc}); move it away or choose another --csv") from None
    missing = [c for c in _BASE_COLUMNS if c not in frame.columns]
    if missing:
        raise CovidCXRError(f"{csv_path}: lacks columns {missing}; it is not a covidcxr predictions CSV (choose another --csv)")
    if any(c not in frame.columns for c in CSV_COLUMNS):
        return {}  # written before abstention existed: its decisions were never checked, predict again
    frame = frame[(frame["run"] == run_dir) & (frame["abstention"].isin([abstention, ""]))]
    return {(row["image"], row["file_sha1"]): row for row in frame.to_dict("records")}


def _write(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(tmp, index=False)


def _hash(path: Path) -> str:
    try:
        return file_sha1(path) if path.is_file() else ""
    except OSError:
        return ""


def predict_to_csv(
    predictor: Any,
    paths: Iterable[Path],
    csv_path: Path,
    gradcam: bool = False,
    on_result: Callable[[Path, dict[str, Any], Any], None] | None = None,
    on_file: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Predict every file under ``paths`` into ``csv_path`` (see the module docstring).

    Args:
        predictor: a loaded `covidcxr.serve.predictor.Predictor`.
        paths: files and folders.
        csv_path: the CSV to write (and to resume from when it exists).
        gradcam: compute Grad-CAM (its lung focus goes to the warnings; slower).
        on_result: called after each new file with ``(path, row, prediction or None)``
            (the CLI writes overlays and prints from it).
        on_file: called after every file, reused ones included (a progress bar).

    Returns:
        ``{"files", "predicted", "refused", "reused", "csv"}`` counts.

    Raises:
        CovidCXRError: an existing ``csv_path`` that is not a predictions CSV.
    """
    run_dir = str(Path(predictor.run.run_dir).resolve())
    abstention = "on" if getattr(predictor, "abstain", True) else "off"
    previous = _read_previous(csv_path, run_dir, abstention)  # rows not reached yet are kept at every flush
    rows: list[dict[str, Any]] = []
    reused = since_flush = 0
    for path in expand_inputs(paths):
        digest = _hash(path)
        earlier = previous.pop((str(path), digest), None)
        if earlier is not None and digest:
            rows.append(earlier)
            reused += 1
            if on_file is not None:
                on_file()
            continue
        row: dict[str, Any] = {"image": str(path), "file_sha1": digest, "run": run_dir}
        prediction = None
        try:
            prediction = predictor.predict_file(path, gradcam=gradcam)
        except CovidCXRError as exc:
            row.update(status="refused", error=getattr(exc, "code", "invalid_input"), detail=getattr(exc, "detail", str(exc)))
        else:
            row.update(
                status="predicted",
                probability=round(float(prediction.probability), 6),
                threshold=prediction.threshold,
                decision=prediction.decision,
                model_decision=prediction.model_decision,
                abstain_reasons=";".join(w.code for w in prediction.abstain_reasons),
                abstain_detail=" | ".join(w.message for w in prediction.abstain_reasons),
                abstention=prediction.abstention,
                warnings=";".join(w.code for w in prediction.warnings),
            )
        rows.append(row)
        if on_result is not None:
            on_result(path, row, prediction)
        if on_file is not None:
            on_file()
        since_flush += 1
        if since_flush >= FLUSH_EVERY:
            _write(csv_path, [*rows, *previous.values()])
            since_flush = 0
    _write(csv_path, rows)
    refused = sum(1 for row in rows if row.get("status") == "refused")
    return {"files": len(rows), "predicted": len(rows) - refused, "refused": refused, "reused": reused, "csv": str(csv_path)}

