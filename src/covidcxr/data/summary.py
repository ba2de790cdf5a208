"""What is in a collection: sources × labels × patients, views, masks, duplicates, unreadable files.

The first thing to look at before training anything: a COVID source with no negatives of
its own, a pediatric negative source, duplicate groups crossing sources, or a class found
at one site only are shortcuts waiting to happen (Ben Ahmed et al. 2021, §II).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.dedup import FingerprintCache, find_near_duplicates
from covidcxr.data.manifest import LABELS, is_missing
from covidcxr.data.sources import SourceTable, detect_source, load_source
from covidcxr.data.sources._common import sha1_cache
from covidcxr.data.splits import check_label_conflicts
from covidcxr.errors import LabelConflictError


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.value_counts(dropna=False).sort_index().items()}


def summarize_manifest(
    table: SourceTable,
    check_images: bool = True,
    workers: int | None = None,
    show_progress: bool = True,
    cache: FingerprintCache | str | Path | None = None,
) -> dict[str, Any]:
    """Summarise a loaded `SourceTable` (see `summarize` for the keys).

    With ``check_images``, every image is decoded (unreadable ones are listed) and
    fingerprinted — or its fingerprint read from ``cache`` — and detected near-duplicates
    are merged with the listed ``dup_group``.
    """
    manifest = table.manifest
    unreadable = [asdict(r) for r in table.rejected]
    listed_groups = manifest["dup_group"][~manifest["dup_group"].map(is_missing)].nunique()
    detected_pairs = None
    if check_images and len(manifest):
        manifest, pairs, rejected = find_near_duplicates(manifest, workers=workers, show_progress=show_progress, cache=cache)
        unreadable.extend(asdict(r) for r in rejected)
        detected_pairs = len(pairs)
    grouped = manifest[~manifest["dup_group"].map(is_missing)]
    group_sources = grouped.groupby("dup_group")["source"].nunique()
    by_source = {
        source: {label: int(n) for label, n in frame["label"].value_counts().reindex(LABELS, fill_value=0).items()}
        for source, frame in manifest.groupby("source", sort=True)
    }
    ages = manifest["age"].dropna()
    conflicts: list[str] = []
    try:
        check_label_conflicts(manifest)
    except LabelConflictError as error:
        conflicts = error.offenders
    origins = _counts(manifest["patient_origin"].fillna("given")) if "patient_origin" in manifest.columns else {}
    return {
        "images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "sources": sorted(by_source),
        "by_source": by_source,
        "by_label": {label: int((manifest["label"] == label).sum()) for label in LABELS},
        "patients_by_source": {s: int(n) for s, n in manifest.groupby("source")["patient_id"].nunique().items()},
        "images_per_patient_max": int(manifest["patient_id"].value_counts().max()) if len(manifest) else 0,
        # where each image's patient came from (hospital adapter: patients.csv, labels.csv,
        # dicom, or none: each such image is its own patient); {} when the layout does not say
        "patient_origin": origins,
        "images_without_patient_id": int(origins.get("none", 0)),
        "views": _counts(manifest["view"]),
        "sex": _counts(manifest["sex"].fillna("unknown")),
        "age": {
            "known": int(len(ages)),
            "min": float(ages.min()) if len(ages) else None,
            "median": float(ages.median()) if len(ages) else None,
            "max": float(ages.max()) if len(ages) else None,
        },
        "with_mask": int((~manifest["mask"].map(is_missing)).sum()),
        "with_mask_by_source": {s: int((~f["mask"].map(is_missing)).sum()) for s, f in manifest.groupby("source")},
        "duplicate_groups": int(grouped["dup_group"].nunique()),
        "duplicate_images": int(len(grouped)),
        "duplicate_groups_listed": int(listed_groups),
        "duplicate_groups_across_sources": int((group_sources > 1).sum()),
        "near_duplicate_pairs_detected": detected_pairs,
        "images_checked": bool(check_images),
        "unreadable": unreadable,
        # byte-identical copies filed under different labels: splitting and training refuse them
        "label_conflicts": conflicts,
    }


def summarize(
    root: str | Path,
    source: str | None = None,
    check_images: bool = True,
    workers: int | None = None,
    show_progress: bool = True,
    cache: FingerprintCache | str | Path | None = None,
) -> dict[str, Any]:
    """Summarise a collection folder (a ``manifest.csv`` collection or any adapter's layout).

    Args:
        root: the folder.
        source: the adapter name; detected when None.
        check_images: decode every image (lists unreadable ones, detects near-duplicates).
        workers: processes for decoding; None uses every available core.
        show_progress: draw a progress bar.
        cache: the fingerprint cache (`covidcxr.data.dedup.FingerprintCache` or its file);
            None fingerprints every image afresh.

    Returns:
        A JSON-ready dict with at least ``images``, ``patients``, ``by_source`` (source →
        label → count), ``with_mask``, ``duplicate_groups`` and ``unreadable`` (a list of
        ``{path, reason}``), plus views, sex, age, masks per source, and duplicate details.

    Example:
        >>> summary = summarize("../shared/data/cxr", check_images=False)  # doctest: +SKIP
        >>> summary["by_source"]["kermany"]["pneumonia"]  # doctest: +SKIP
        640
    """
    root = Path(root)
    adapter = source or detect_source(root)
    if isinstance(cache, (str, Path)):
        cache = FingerprintCache(cache)
    with sha1_cache(cache):
        table = load_source(root, adapter)
    summary = summarize_manifest(table, check_images=check_images, workers=workers, show_progress=show_progress, cache=cache)
    return {"root": str(root), "adapter": adapter, **summary}


def summary_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """The source × label count table of a summary, with totals, patients and masks."""
    frame = pd.DataFrame(summary["by_source"]).T.reindex(columns=list(LABELS), fill_value=0)
    frame["total"] = frame.sum(axis=1)
    frame["patients"] = pd.Series(summary["patients_by_source"])
    frame["masks"] = pd.Series(summary["with_mask_by_source"])
    frame.loc["total"] = frame.sum(axis=0)
    frame.loc["total", "patients"] = summary["patients"]
    return frame.astype(np.int64)
