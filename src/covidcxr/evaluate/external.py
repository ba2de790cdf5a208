"""A trained run scored on a new collection: ``covidcxr evaluate RUN --data DIR``.

A radiology team's first question is "does this model work on *our* images?". The answer
must not be flattered by images the model already knows, so (the rule of
`covidcxr.experiments.testsets`, applied to any collection):

1. the collection is read by a source adapter (`covidcxr.data.sources.load_source`: any
   layout, a hospital's folder / CSV / DICOM layout included); a layout that lists no
   duplicates gets its copies and near-duplicates linked from the pixels
   (`covidcxr.data.splits.link_duplicates`, which also refuses copies filed under
   different labels);
2. the images that fit the run's task are kept (`covidcxr.train.data.select_task`), the
   others listed with their label;
3. every image **linked** to what the run trained or validated on (`RunDir.seen`) is
   excluded and listed with the reason: the same patient, the same file (path, declared
   ``sha1`` or the hash of the bytes on disk), or a near-duplicate of a training/validation
   image (perceptual hash + thumbnail correlation, `covidcxr.data.dedup`, computed across
   both sets: a collection's own ``dup_group`` names mean nothing to another's) — and,
   with it, every image of the same patient or copy group in the new collection;
4. the rest go through the run's own preprocessing and model (`load_run`: the weights
   `RunDir.weights` designates) in chunks; each chunk's predictions are flushed atomically,
   so a rerun skips the images already scored (and those the preprocessing refused);
5. per-source metrics with intervals, seen vs unseen
   (`covidcxr.evaluate.cross_source.evaluate_predictions`, the body of every evaluation).

Layout of ``RUN/external/<name>/``: ``predictions.parquet`` (``image, source, label,
patient_id, probability`` ...), ``rejected.csv`` (refused by the preprocessing, with the
reason), ``excluded.csv`` (linked or outside the task, with the reason), ``evaluation.json``
(written last).

Example::

    >>> report = evaluate_external("runs/small_shared", "../shared/data/cxr")   # doctest: +SKIP
    >>> report["per_source"]["nih"]["auc"]                                       # doctest: +SKIP
    {'estimate': 0.61, 'low': 0.55, 'high': 0.66, ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.manifest import is_missing
from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.cross_source import evaluate_predictions, json_ready
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.rundir import RunDir, SeenData

__all__ = ["EXTERNAL_COLUMNS", "collection_rows", "evaluate_external", "external_name", "linked_reasons", "read_collection", "read_external", "reason_kind", "score_chunks", "score_resumably", "write_evaluation"]

#: the per-image columns of ``external/<name>/predictions.parquet`` (first the required five).
EXTERNAL_COLUMNS = ("image", "source", "label", "patient_id", "probability", "class_name", "target", "seen", "view", "sex", "age")
PREDICTIONS, EVALUATION, EXCLUDED, REJECTED, PROGRESS = "predictions.parquet", "evaluation.json", "excluded.csv", "rejected.csv", "progress.json"


def _say_nothing(_message: str) -> None:
    return None


def external_name(data: str | Path) -> str:
    """The default ``external/<name>``: the collection folder's name."""
    name = Path(data).resolve().name
    return name or "external"


# ------------------------------------------------------------------------------- the collection


def read_collection(data: str | Path, adapter: str | None = None, progress: bool = False) -> tuple[pd.DataFrame, list[Any]]:
    """A collection's manifest with its copies and near-duplicates linked, and what could not be read.

    Args:
        data: the collection folder (any layout a source adapter reads).
        adapter: the adapter's name (default: detected from the layout).

    Returns:
        ``(manifest, rejected)``: the adapter's manifest (``dup_group`` filled from the pixels
        for a raw layout, `covidcxr.data.splits.link_duplicates`) and the `Rejection` items.

    Raises:
        CovidCXRError: no folder, no known layout, copies filed under different labels.
    """
    from covidcxr.data.dedup import default_fingerprint_cache
    from covidcxr.data.sources import detect_source, load_source
    from covidcxr.data.splits import link_duplicates

    folder = Path(data)
    if not folder.is_dir():
        raise CovidCXRError(f"--data {folder}: not a folder (expected a collection a source adapter reads; see `covidcxr data sources`)")
    adapter = adapter or detect_source(folder)
    table = load_source(folder, adapter)
    manifest, rejected = table.manifest, list(table.rejected)
    if adapter != "collection":  # a raw layout lists no duplicates: link them from the pixels
        manifest, unreadable = link_duplicates(manifest, show_progress=progress, cache=default_fingerprint_cache())
        rejected += unreadable
    return manifest, rejected


def collection_rows(data: str | Path, recipe: Any, adapter: str | None = None, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[Any]]:
    """The collection's images that fit the run's task, those that do not, and what the adapter refused.

    Args:
        data: the collection folder (any layout a source adapter reads).
        recipe: the run's `TrainRecipe` (its task; its sources are *not* a filter here).
        adapter: the adapter's name (default: detected from the layout).

    Returns:
        ``(rows, outside, rejected)``: manifest rows with ``class_name``/``target``; rows whose
        label the task does not use (with ``reason``); the adapter's and decoder's
        `Rejection` items.

    Raises:
        CovidCXRError: no folder, no known layout, copies filed under different labels.
    """
    from covidcxr.train.data import select_task

    folder = Path(data)
    manifest, rejected = read_collection(folder, adapter, progress)
    every_source = recipe.model_copy(deep=True)
    every_source.data.sources, every_source.data.negatives_from = [], []
    if every_source.data.split.kind == "loso":
        every_source.data.split.kind = "holdout"
    try:
        rows, _ = select_task(manifest, every_source)
    except CovidCXRError as exc:
        raise CovidCXRError(f"--data {folder}: {exc}") from None
    outside = manifest[~manifest["image"].astype(str).isin(set(rows["image"].astype(str)))].copy()
    outside["reason"] = [f"label {label!r} is outside the run's task {recipe.data.task}" for label in outside["label"]]
    return rows, outside, rejected


# ------------------------------------------------------------------------------- what the run saw


def _file_hashes(paths: list[str]) -> list[str | None]:
    """sha1 of each file's bytes through the fingerprint cache (unchanged files are not re-read)."""
    from covidcxr.data.dedup import FingerprintCache, default_fingerprint_cache

    cache = FingerprintCache(default_fingerprint_cache())
    out: list[str | None] = []
    for path in paths:
        try:
            out.append(cache.sha1(path))
        except OSError:
            out.append(None)
    cache.flush()
    return out


def _near_duplicates_of_seen(rows: pd.DataFrame, seen_paths: list[str], seen_prints: Any, progress: bool) -> dict[int, str]:
    """Row index -> the training/validation image it is a near-duplicate of.

    ``seen_prints`` are the seen images' fingerprints (`covidcxr.evaluate.seen_prints`), row-aligned
    with ``seen_paths``; the new rows are fingerprinted here.
    """
    from covidcxr.data.dedup import Fingerprints, default_fingerprint_cache, fingerprint_images, near_duplicate_pairs

    if not len(rows) or not seen_paths:
        return {}
    new, _ = fingerprint_images(rows["image"].astype(str).tolist(), show_progress=progress, cache=default_fingerprint_cache())
    prints = Fingerprints(
        np.concatenate([np.asarray(new.hashes, dtype=np.uint64), np.asarray(seen_prints.hashes, dtype=np.uint64)]),
        np.concatenate([np.asarray(new.thumbnails, dtype=np.uint8), np.asarray(seen_prints.thumbnails, dtype=np.uint8)]),
        np.concatenate([np.asarray(new.valid, dtype=bool), np.asarray(seen_prints.valid, dtype=bool)]),
    )
    pairs = near_duplicate_pairs(prints)
    n = len(rows)
    found: dict[int, str] = {}
    for i, j in zip(pairs["i"].to_numpy(dtype=int), pairs["j"].to_numpy(dtype=int)):
        if (i < n) != (j < n):  # one new image, one the run saw
            mine, theirs = (i, j) if i < n else (j, i)
            found.setdefault(mine, seen_paths[theirs - n])
    return found


def linked_reasons(rows: pd.DataFrame, seen: SeenData, same_collection: bool = False, progress: bool = False, say: Callable[[str], None] = _say_nothing) -> pd.Series:
    """Why each row is linked to what a run trained or validated on ("" when it is not).

    Direct links: the same patient, the same file path, the same file hash (``sha1`` or
    ``file_sha1``, declared or computed from the bytes), the same ``dup_group`` (only when
    ``same_collection``: group names are a collection's own), a near-duplicate of a seen
    image. Then each linked row's patient and copy group in ``rows``
    (`covidcxr.data.splits.linked_groups`) goes with it.

    Args:
        rows: ``(N,)`` manifest rows of the new collection.
        seen: `RunDir.seen()` of the run.
        same_collection: whether ``rows`` come from the run's own collection.
        say: where the warning goes when training/validation images cannot be read.

    Returns:
        ``(N,)`` strings aligned with ``rows``; ``attrs["unreadable_seen"]`` counts the
        training/validation images with neither a stored fingerprint (`RunDir.seen_fingerprints`)
        nor a readable file, whose near-duplicates therefore cannot be found (never silent:
        ``say`` warns with an example path).
    """
    from covidcxr.data.splits import linked_groups
    from covidcxr.evaluate.seen_prints import seen_fingerprints

    rows = rows.reset_index(drop=True)
    reasons = pd.Series([""] * len(rows), dtype=object)

    def mark(mask: np.ndarray, text: str) -> None:
        free = (reasons == "").to_numpy() & mask
        reasons[free] = text

    links = seen.links()
    mark(rows["patient_id"].astype(str).isin(links["patient_id"]).to_numpy(), "same patient as a training/validation image")
    mark(rows["image"].astype(str).isin(links["image"]).to_numpy(), "the same file as a training/validation image")
    seen_hashes = set(links["sha1"]) | set(h for h in _file_hashes(seen.rows["image"].astype(str).unique().tolist()) if h)
    if "file_sha1" in seen.rows.columns:
        seen_hashes |= set(seen.rows["file_sha1"].dropna().astype(str))
    for column in ("sha1", "file_sha1"):
        if column in rows.columns:
            mark(rows[column].astype(str).isin(seen_hashes).to_numpy() & ~rows[column].map(is_missing).to_numpy(), "byte-identical copy of a training/validation image")
    own = np.array([h in seen_hashes for h in _file_hashes(rows["image"].astype(str).tolist())], dtype=bool)
    mark(own, "byte-identical copy of a training/validation image")
    if same_collection and "dup_group" in rows.columns:
        mark(rows["dup_group"].astype(str).isin(links["dup_group"]).to_numpy() & ~rows["dup_group"].map(is_missing).to_numpy(), "same near-duplicate group as a training/validation image")
    # Stored fingerprints first (written at the end of training, shipped with a model), then readable files.
    found, seen_prints, unreadable = seen_fingerprints(seen, progress)
    if unreadable:
        say(
            f"warning: {len(unreadable)} of {len(found) + len(unreadable)} training/validation images have no stored "
            f"fingerprint and cannot be read (e.g. {unreadable[0]}, relative to {Path.cwd()}): near-duplicates of them "
            "cannot be found or excluded — run from where the run's collection paths resolve"
        )
    for index, other in _near_duplicates_of_seen(rows, found, seen_prints, progress).items():
        if reasons[index] == "":
            reasons[index] = f"near-duplicate of training/validation image {Path(other).name}"
    direct = (reasons != "").to_numpy()
    if direct.any():
        groups = linked_groups(rows)
        tainted = np.isin(groups, groups[direct]) & ~direct
        reasons[tainted] = "same patient or copy group as an excluded image"
    reasons.attrs["unreadable_seen"] = len(unreadable)
    return reasons


# ------------------------------------------------------------------------------- scoring, resumable


def _read_done(out: Path, fingerprint: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What an earlier pass of the same model already scored / saw refused (nothing if the model changed)."""
    progress_file = out / PROGRESS
    if progress_file.is_file() and json.loads(progress_file.read_text()).get("weights") == fingerprint:
        scored = pd.read_parquet(out / PREDICTIONS) if (out / PREDICTIONS).is_file() else pd.DataFrame()
        rejected = pd.read_csv(out / REJECTED) if (out / REJECTED).is_file() else pd.DataFrame()
        return scored, rejected
    return pd.DataFrame(), pd.DataFrame()


def score_resumably(run_dir: str | Path, rows: pd.DataFrame, out: Path, chunk: int = 512, progress: bool = False, say: Callable[[str], None] = _say_nothing) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``rows`` with the run's model, ``chunk`` images at a time, each chunk flushed atomically.

    Images already in ``out/predictions.parquet`` (or refused in ``out/rejected.csv``) by the
    same weights (`ModelWeights.fingerprint`, kept in ``out/progress.json``) are skipped, so an
    interrupted evaluation resumes where it stopped.

    Returns:
        ``(scored, rejected)``: one row per scored image (`EXTERNAL_COLUMNS` that exist, plus
        ``positive``), one row per refused image with ``reason``.
    """
    from covidcxr.experiments.testsets import predict_images

    def predict(part: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        scored, refused = predict_images(run_dir, part, progress=progress)
        return scored.assign(target=scored["positive"]), refused

    return score_chunks(rows, out, RunDir(run_dir).weights().fingerprint(), predict, chunk=chunk, say=say)


def score_chunks(
    rows: pd.DataFrame,
    out: Path,
    fingerprint: str,
    predict: Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]],
    chunk: int = 512,
    say: Callable[[str], None] = _say_nothing,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``rows`` with ``predict`` (rows -> scored rows with ``probability``, ``target``; refused rows with ``reason``), resumably.

    The body of `score_resumably`, for any model whose identity ``fingerprint`` names (a
    run's weights, a foreign model's file): ``chunk`` rows at a time, each chunk flushed
    atomically to ``out/predictions.parquet`` and ``out/rejected.csv``; rows already there
    under the same fingerprint (``out/progress.json``) are skipped.
    """
    out.mkdir(parents=True, exist_ok=True)
    scored, rejected = _read_done(out, fingerprint)
    atomic_write_text(out / PROGRESS, json.dumps({"weights": fingerprint}) + "\n")
    done = set(scored["image"].astype(str)) if len(scored) else set()
    done |= set(rejected["image"].astype(str)) if len(rejected) else set()
    todo = rows[~rows["image"].astype(str).isin(done)].reset_index(drop=True)
    say(f"{len(rows) - len(todo)} images already scored by these weights; {len(todo)} to score")
    for start in range(0, len(todo), chunk):
        part, refused = predict(todo.iloc[start : start + chunk])
        keep = [c for c in (*EXTERNAL_COLUMNS, "mask", "dup_group", "file_sha1", "sha1") if c in part.columns]
        scored = pd.concat([scored, part[keep]], ignore_index=True) if len(scored) else part[keep].reset_index(drop=True)
        if len(refused):
            refused = refused[[c for c in ("image", "source", "reason") if c in refused.columns]]
            rejected = pd.concat([rejected, refused], ignore_index=True) if len(rejected) else refused.reset_index(drop=True)
        with atomic_path(out / PREDICTIONS) as tmp:
            scored.to_parquet(tmp, index=False)
        with atomic_path(out / REJECTED) as tmp:
            rejected.reindex(columns=["image", "source", "reason"]).to_csv(tmp, index=False)
        say(f"scored {min(start + chunk, len(todo))}/{len(todo)}")
    return scored, rejected.reindex(columns=["image", "source", "reason"])


# ------------------------------------------------------------------------------- the whole step


def _same_collection(recipe: Any, data: Path) -> bool:
    folder = getattr(recipe.data, "collection", None)
    return bool(folder) and Path(folder).resolve() == data.resolve()


def evaluate_external(
    run_dir: str | Path,
    data: str | Path,
    name: str | None = None,
    adapter: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 512,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> dict[str, Any]:
    """Score a run on a collection, leakage excluded, and write ``RUN/external/<name>/``.

    Args:
        run_dir: a binary or multi-class run (multi-class: the positive class' probability,
            `covidcxr.experiments.testsets.positive_class`).
        data: the collection folder.
        name: the ``external/<name>`` folder (default: the collection folder's name).
        adapter: the source adapter (default: detected).
        n_boot, seed: the bootstrap behind the within-source and source-only intervals.
        chunk: images per flushed chunk.

    Returns:
        The ``evaluation.json`` content: ``run``, ``data``, ``name``, ``predictions``
        (the file name), ``per_source`` ({source: {n_images, n_patients, auc: {estimate, low,
        high}, sensitivity, ...}}), ``seen_unseen``, ``overall``, ``within_source``,
        ``source_only``, ``threshold``, ``operating_point``, ``excluded`` (counts by reason,
        the file), ``rejected`` (count, the file), ``seconds``.

    Raises:
        CovidCXRError: not a run, not a collection, nothing left to score.
    """
    started = time.perf_counter()
    run = RunDir(run_dir)
    recipe = run.read_recipe()
    data = Path(data)
    name = name or external_name(data)
    out = run.external(name)
    say(f"reading {data} and linking its copies")
    rows, outside, refused = collection_rows(data, recipe, adapter, progress)
    seen = run.seen()
    say(f"{len(rows)} images fit the task; checking links to the run's {len(seen.rows)} training/validation images")
    reasons = linked_reasons(rows, seen, same_collection=_same_collection(recipe, data), progress=progress, say=say)
    linked = (reasons != "").to_numpy()
    excluded = pd.concat([rows[linked].assign(reason=reasons[linked].to_numpy()), outside], ignore_index=True)
    excluded = excluded.reindex(columns=["image", "source", "label", "patient_id", "reason"])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EXCLUDED) as tmp:
        excluded.to_csv(tmp, index=False)
    candidates = rows[~linked].reset_index(drop=True).assign(split="external")
    if candidates.empty:
        raise CovidCXRError(f"--data {data}: every image of the task is linked to the run's training/validation data (see {out / EXCLUDED})")
    scored, rejected = score_resumably(run.path, candidates, out, chunk=chunk, progress=progress, say=say)
    # the file holds exactly this pass' images (an earlier pass on other data under the same name
    # may have left others), with whether each image's source is one the run trained on
    scored = scored[scored["image"].astype(str).isin(set(candidates["image"].astype(str)))].reset_index(drop=True)
    if scored.empty:
        raise CovidCXRError(f"--data {data}: the preprocessing refused every image (see {out / REJECTED})")
    scored["seen"] = scored["source"].astype(str).isin(seen.sources)
    with atomic_path(out / PREDICTIONS) as tmp:
        scored.to_parquet(tmp, index=False)
    train_rows = run.read_manifest()
    train_rows = train_rows[train_rows["split"] == "train"].assign(target=lambda f: (f["class_name"].astype(str) == _positive(recipe)).astype(np.int64))
    point = run.operating_point()
    report = {
        "run": run.name,
        "run_dir": str(run.path),
        "data": str(data),
        "name": name,
        "adapter": adapter,
        "model": run.weights().describe(),
        "predictions": PREDICTIONS,
        **evaluate_predictions(scored, train_rows, seen.sources, run.threshold, n_boot, seed),
        "operating_point": {**point.to_dict(), "describe": point.describe()},
        "n_candidates": int(len(rows) + len(outside)),
        "unreadable_training_images": int(reasons.attrs["unreadable_seen"]),
    }
    return write_evaluation(out, report, excluded, rejected, refused, n_boot, seed, started)


def write_evaluation(out: Path, report: dict[str, Any], excluded: pd.DataFrame, rejected: pd.DataFrame, refused: list[Any], n_boot: int, seed: int, started: float) -> dict[str, Any]:
    """Complete an evaluation on another collection with what was left out and how, and write it atomically.

    One writer of ``evaluation.json`` for a run's (`evaluate_external`) and a foreign model's
    (`covidcxr.evaluate.foreign.evaluate_foreign`) evaluations, so both keep the same keys.

    Args:
        out: the results folder (``RUN/external/NAME/`` or a foreign model's ``--out``).
        report: the evaluation so far (metrics, operating point, ``n_candidates`` ...).
        excluded: images linked to the training data, with a ``reason`` column (``excluded.csv``).
        rejected: images refused while reading or preprocessing (``rejected.csv``).
        refused: the adapter's refusals (objects with ``path`` and ``reason``).
        n_boot, seed: the bootstrap's settings. started: ``time.perf_counter()`` at the start.

    Returns:
        The JSON-ready report, as written to ``out / evaluation.json``.
    """
    report = {
        **report,
        "excluded": {"file": EXCLUDED, "n": int(len(excluded)), "by_reason": excluded["reason"].map(reason_kind).value_counts().to_dict()},
        "rejected": {"file": REJECTED, "n": int(len(rejected)), "adapter_refused": [{"path": str(r.path), "reason": str(r.reason)} for r in refused]},
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = json_ready(report)
    atomic_write_text(out / EVALUATION, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _positive(recipe: Any) -> str:
    from covidcxr.experiments.testsets import positive_class

    return positive_class(recipe)


def reason_kind(reason: str) -> str:
    """The reason without its particulars (an image's name), for counting."""
    return reason.split(" image ")[0] if reason.startswith("near-duplicate") else reason


def read_external(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``RUN/external/<name>/evaluation.json`` (and its ``audit/audit.json`` as ``audit``), by name."""
    root = RunDir(run_dir).path / RunDir.EXTERNAL
    found: dict[str, dict[str, Any]] = {}
    for folder in sorted(root.glob("*/")) if root.is_dir() else []:
        file = folder / EVALUATION
        if file.is_file():
            report = json.loads(file.read_text())
            audit = folder / "audit" / "audit.json"
            if audit.is_file():
                report["audit"] = json.loads(audit.read_text())
            found[folder.name] = report
    return found
