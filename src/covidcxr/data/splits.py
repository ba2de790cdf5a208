"""Patient-disjoint splits, grouped cross-validation, leave-one-source-out, and the leakage check.

Every split here is made over *linked groups*, not images: images of the same patient,
byte-identical copies (same ``sha1``) and near-duplicate images (same ``dup_group``, even
under different patient ids) form one group and always land on the same side. Copies of
one file filed under different labels are an error (`check_label_conflicts`): no split
can be right while the labels contradict each other. `link_duplicates` fills
``dup_group`` from the pixels (`covidcxr.data.dedup`) for layouts that list none. "Excluding from the test-set exams taken from
patients already present in the training-set is important ... to exclude the deep model
has not learned a 'patient's lung shape' feature" (Tartaglione et al. 2020, §3.2).

Every function ends by running `check_leakage`, which raises `LeakageError` listing each
patient, exact copy or duplicate group found on two sides — an error, never a warning.

Defaults follow Tartaglione et al. §3.2: 70% train / 30% test, then 80/20 of the training
part for train/val. Hall et al. and Apostolopoulos et al. use 10-fold cross-validation;
Ben Ahmed et al. hold whole sources out (seen vs unseen sources).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidcxr.data.dedup import (
    FingerprintCache,
    Fingerprints,
    edges_of_shared_values,
    find_near_duplicates,
    link_groups,
    near_duplicate_pairs,
)
from covidcxr.data.manifest import file_sha1, is_missing, validate_manifest
from covidcxr.data.sources.base import Rejection
from covidcxr.errors import CovidCXRError, LabelConflictError, LeakageError

# Columns whose shared values link rows into one group, and what a shared value means.
# ``file_sha1`` is the preprocessing cache's hash of the bytes actually read (a manifest's
# ``sha1`` may describe the original download); both are used when present.
LINK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("patient_id", "patient"),
    ("sha1", "exact copy (sha1)"),
    ("file_sha1", "exact copy (file sha1)"),
    ("dup_group", "near-duplicate group"),
)


def linked_groups(manifest: pd.DataFrame) -> np.ndarray:
    """Group id per row: rows sharing a ``patient_id``, a ``sha1`` or a ``dup_group`` are linked.

    Returns:
        ``(N,)`` int array, row-aligned with ``manifest``.

    Example:
        >>> m = pd.DataFrame({"patient_id": ["s:1", "s:1", "s:2", "s:3"], "dup_group": [None, None, "d1", "d1"]})
        >>> linked_groups(m).tolist()
        [0, 0, 1, 1]
    """
    frame = manifest.reset_index(drop=True)
    edges = [edges_of_shared_values(frame[column]) for column, _ in LINK_COLUMNS if column in frame.columns]
    return link_groups(len(frame), np.concatenate(edges) if edges else np.zeros((0, 2), np.int64))


def check_label_conflicts(manifest: pd.DataFrame) -> None:
    """Raise `LabelConflictError` when byte-identical copies of a file carry different labels.

    Exact copies (same ``sha1`` or ``file_sha1``) are one radiograph: two labels for it
    mean the collection is mislabelled, and no split or training can be trusted until a
    person decides. Near-duplicates (``dup_group``) with different labels are not refused:
    a re-encoded or re-cropped figure may legitimately be relabelled by another source,
    and the split keeps them together anyway.

    Raises:
        LabelConflictError: one offender per conflicting file hash, naming every file and
            its label.

    Example:
        >>> m = pd.DataFrame({"image": ["/c/covid/0.png", "/c/normal/9.png"], "label": ["covid", "normal"],
        ...                   "sha1": ["a" * 40, "a" * 40]})
        >>> check_label_conflicts(m)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        covidcxr.errors.LabelConflictError: byte-identical copies filed under different labels (1 offenders): ...
    """
    offenders: list[str] = []
    seen: set[frozenset[str]] = set()
    for column in ("sha1", "file_sha1"):
        if column not in manifest.columns:
            continue
        present = manifest[~manifest[column].map(is_missing)]
        labels = present.groupby(column)["label"].nunique()
        for value in labels.index[labels > 1]:
            rows = present[present[column] == value]
            images = frozenset(rows["image"].astype(str))
            if images in seen:
                continue
            seen.add(images)
            listed = ", ".join(f"{image} ({label})" for image, label in zip(rows["image"], rows["label"]))
            offenders.append(f"{column} {str(value)[:12]}: {listed}")
    if offenders:
        raise LabelConflictError(
            "byte-identical copies filed under different labels; keep one copy with its right label "
            "(or remove all) before splitting or training",
            offenders,
        )


def link_duplicates(
    manifest: pd.DataFrame,
    workers: int | None = None,
    show_progress: bool = False,
    cache: FingerprintCache | str | Path | None = None,
) -> tuple[pd.DataFrame, list[Rejection]]:
    """Fill ``dup_group`` from the pixels and refuse copies with conflicting labels.

    The step every path that splits or trains runs on a layout that lists no duplicates
    (a hospital's folders, a public layout): exact copies (``sha1``, and ``file_sha1``, the
    hash of the bytes actually on disk, added here) and near-duplicates detected by
    `covidcxr.data.dedup.find_near_duplicates` join one ``dup_group``.

    ``cache`` (a `covidcxr.data.dedup.FingerprintCache` or its file) supplies the fingerprints
    and file hashes of unchanged files (same path, size, mtime) instead of reading them again.

    Returns:
        ``(manifest, unreadable)``: the readable rows with ``dup_group`` and ``file_sha1`` filled, and one
        `Rejection` per image that could not be decoded (left out, with the reason).

    Raises:
        LabelConflictError: byte-identical copies with different labels (`check_label_conflicts`).
    """
    if manifest.empty:
        check_label_conflicts(manifest)
        return manifest.reset_index(drop=True), []
    if isinstance(cache, (str, Path)):
        cache = FingerprintCache(cache)
    linked, _, unreadable = find_near_duplicates(manifest, workers=workers, show_progress=show_progress, cache=cache)
    bad = {item.path for item in unreadable}
    linked = linked[~linked["image"].astype(str).isin(bad)].reset_index(drop=True)
    # The bytes actually there, not the manifest's word for them (a collection's sha1 may
    # describe the original download): copies are linked and checked by this too.
    linked["file_sha1"] = [file_sha1(path) if cache is None else cache.sha1(path) for path in linked["image"]]
    if cache is not None:
        cache.flush()
    check_label_conflicts(linked)
    return linked, unreadable


def _group_strata(manifest: pd.DataFrame, groups: np.ndarray, stratify: Sequence[str]) -> pd.Series:
    """The stratum of each group: the most common stratify-tuple among its images."""
    if not stratify:
        return pd.Series("all", index=np.unique(groups))
    for column in stratify:
        if column not in manifest.columns:
            raise CovidCXRError(f"cannot stratify by {column!r}: the manifest has no such column")
    key = manifest[list(stratify)].astype(str).agg("|".join, axis=1).to_numpy()
    frame = pd.DataFrame({"group": groups, "key": key})
    # mode per group; ties broken by the sorted key so the result is deterministic
    counts = frame.groupby(["group", "key"]).size().reset_index(name="n")
    counts = counts.sort_values(["group", "n", "key"], ascending=[True, False, True])
    return counts.drop_duplicates("group").set_index("group")["key"]


def _draw_groups(sizes: pd.Series, strata: pd.Series, fraction: float, rng: np.random.Generator) -> set[int]:
    """Draw whole groups so each stratum contributes ``fraction`` of its images (as near as groups allow).

    Written by hand: scikit-learn's GroupShuffleSplit does not stratify, and its
    StratifiedGroupKFold only yields 1/k fractions, not 30% or 20%.
    """
    chosen: set[int] = set()
    for stratum in sorted(strata.unique()):
        members = strata.index[strata.to_numpy() == stratum].to_numpy()
        members = members[rng.permutation(len(members))]
        if len(members) < 2:
            continue  # a single group cannot be split; it stays on the larger side
        member_sizes = sizes.loc[members].to_numpy()
        target = fraction * member_sizes.sum()
        cumulative = np.cumsum(member_sizes)
        # the prefix whose image count is closest to the target, at least one group, never all
        take = int(np.argmin(np.abs(cumulative - target))) + 1
        take = min(max(take, 1), len(members) - 1)
        chosen.update(int(g) for g in members[:take])
    return chosen


def split_train_val_test(
    manifest: pd.DataFrame,
    test_size: float = 0.3,
    val_size: float = 0.2,
    stratify: Sequence[str] = ("label",),
    seed: int = 0,
) -> pd.DataFrame:
    """Patient-disjoint, stratified train/val/test split.

    Args:
        manifest: the images to split.
        test_size: fraction of images for test (Tartaglione et al.: 0.3).
        val_size: fraction of the *remaining* images for validation (Tartaglione et al.: 0.2).
        stratify: columns whose combination is kept in proportion, e.g. ``("source", "label")``.
        seed: random seed; the same seed gives the same split.

    Returns:
        A copy of ``manifest`` with a ``split`` column (``train``/``val``/``test``).

    Raises:
        LeakageError: never for this function's own output (it is checked anyway).

    Example:
        >>> split = split_train_val_test(manifest, seed=0)  # doctest: +SKIP
        >>> split["split"].value_counts(normalize=True).round(2)  # doctest: +SKIP
        train 0.56, test 0.30, val 0.14
    """
    if not 0.0 <= test_size < 1.0 or not 0.0 <= val_size < 1.0:
        raise CovidCXRError(f"test_size and val_size must be in [0, 1); got {test_size} and {val_size}")
    out = manifest.reset_index(drop=True).copy()
    check_label_conflicts(out)
    groups = linked_groups(out)
    sizes = pd.Series(groups).value_counts()
    strata = _group_strata(out, groups, stratify)
    rng = np.random.default_rng(seed)
    test_groups = _draw_groups(sizes, strata, test_size, rng) if test_size > 0 else set()
    remaining = strata.drop(index=list(test_groups))
    val_groups = _draw_groups(sizes, remaining, val_size, rng) if val_size > 0 else set()
    split = np.full(len(out), "train", dtype=object)
    split[np.isin(groups, list(test_groups))] = "test"
    split[np.isin(groups, list(val_groups))] = "val"
    out["split"] = split
    check_leakage(out)
    return validate_manifest(out)


def group_kfold(
    manifest: pd.DataFrame, n_splits: int = 10, stratify: Sequence[str] = ("label",), seed: int = 0
) -> pd.DataFrame:
    """Patient-grouped, stratified k-fold assignment (Hall et al. and Apostolopoulos et al.: 10 folds).

    Returns:
        A copy of ``manifest`` with an integer ``fold`` column (0..n_splits-1). Fold ``k``'s
        test set is ``fold == k``; its training set is every other fold.
    """
    out = manifest.reset_index(drop=True).copy()
    check_label_conflicts(out)
    groups = linked_groups(out)
    if len(np.unique(groups)) < n_splits:
        raise CovidCXRError(f"cannot make {n_splits} folds from {len(np.unique(groups))} patient groups")
    strata = _group_strata(out, groups, stratify)
    row_strata = strata.loc[groups].to_numpy()
    folds = np.full(len(out), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, test_rows) in enumerate(splitter.split(np.zeros(len(out)), row_strata, groups)):
        folds[test_rows] = fold
    out["fold"] = pd.array(folds, dtype="Int64")
    check_leakage(out, column="fold")
    return validate_manifest(out)


def leave_one_source_out(
    manifest: pd.DataFrame,
    test_source: str,
    val_size: float = 0.2,
    stratify: Sequence[str] = ("source", "label"),
    seed: int = 0,
) -> tuple[pd.DataFrame, list[Rejection]]:
    """Hold one source out as the unseen test set; split the others into train/val by patient.

    Images of other sources that are linked (same patient or near-duplicate) to an image
    of the held-out source are removed from training — a copy of a test image in the
    training set would make the "unseen" source seen — and returned as rejections.

    Returns:
        ``(split manifest, removed)``: the manifest with ``split`` for every kept row, and
        one `Rejection` per removed image naming the test image it duplicates.
    """
    out = manifest.reset_index(drop=True).copy()
    if test_source not in set(out["source"]):
        raise CovidCXRError(f"source {test_source!r} is not in the manifest; it has {sorted(set(out['source']))}")
    check_label_conflicts(out)
    groups = linked_groups(out)
    is_test = (out["source"] == test_source).to_numpy()
    test_linked = np.isin(groups, np.unique(groups[is_test]))
    removed_rows = np.nonzero(test_linked & ~is_test)[0]
    removed: list[Rejection] = []
    for row in removed_rows:
        twins = out.loc[is_test & (groups == groups[row]), "image"].tolist()
        removed.append(Rejection(out.at[row, "image"], f"linked to held-out {test_source} image(s) {twins[:3]}; removed from training"))
    train_part = out[~test_linked]
    train_part = split_train_val_test(train_part, test_size=0.0, val_size=val_size, stratify=stratify, seed=seed)
    test_part = out[is_test].copy()
    test_part["split"] = "test"
    result = pd.concat([train_part, test_part], ignore_index=True)
    check_leakage(result)
    return validate_manifest(result), removed


def _describe(rows: pd.DataFrame, column: str) -> str:
    parts = []
    for side, images in rows.groupby(column, sort=True)["image"]:
        names = ", ".join(str(p).rsplit("/", 1)[-1] for p in images.head(3))
        more = f" +{len(images) - 3}" if len(images) > 3 else ""
        parts.append(f"{side}: {names}{more}")
    return "; ".join(parts)


def check_leakage(manifest: pd.DataFrame, column: str = "split", fingerprints: Fingerprints | None = None) -> None:
    """Raise `LeakageError` if a patient, an exact copy or a near-duplicate sits on two sides of ``column``.

    Exact copies are found from the file hashes (``sha1``, and ``file_sha1`` when
    present), not only from ``dup_group``: a manifest whose ``dup_group`` was never filled
    (or was filled by someone else) cannot hide a copy on both sides.

    Args:
        manifest: a split manifest (``split`` or ``fold`` column); rows with an empty
            value in ``column`` are ignored.
        column: ``"split"`` (train/val/test must be mutually disjoint) or ``"fold"``.
        fingerprints: optional, row-aligned with ``manifest`` (`covidcxr.data.dedup`):
            also look for near-duplicate pairs that the ``dup_group`` column does not
            record yet (e.g. a split made by someone else).

    Raises:
        LeakageError: listing every offending patient and duplicate group with the images
            and the sides they fell on.
    """
    if column not in manifest.columns:
        raise CovidCXRError(f"cannot check leakage: the manifest has no {column!r} column")
    assigned = manifest[~manifest[column].map(is_missing)]
    offenders: list[str] = []
    for key, kind in LINK_COLUMNS:
        if key not in assigned.columns:
            continue
        present = assigned[~assigned[key].map(is_missing)]
        sides = present.groupby(key)[column].nunique()
        for value in sides.index[sides > 1]:
            offenders.append(f"{kind} {value} -> {_describe(present[present[key] == value], column)}")
    if fingerprints is not None:
        if len(fingerprints) != len(manifest):
            raise CovidCXRError(f"fingerprints have {len(fingerprints)} rows but the manifest has {len(manifest)}")
        sides = manifest[column].to_numpy()
        images = manifest["image"].to_numpy()
        for pair in near_duplicate_pairs(fingerprints).itertuples(index=False):
            side_i, side_j = sides[pair.i], sides[pair.j]
            if is_missing(side_i) or is_missing(side_j) or side_i == side_j:
                continue
            offenders.append(
                f"near-duplicate images (hash distance {pair.hash_distance}, correlation {pair.correlation:.3f}) -> "
                f"{side_i}: {images[pair.i]}; {side_j}: {images[pair.j]}"
            )
    if offenders:
        raise LeakageError(f"leakage across '{column}': the same patient or near-duplicate image on two sides", offenders)
