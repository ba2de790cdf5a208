"""A foreign model scored on a collection: ``covidcxr evaluate --model MODEL.yaml --data DIR``.

The same steps as a run scored on another collection (`covidcxr.evaluate.external`), with a
model covidcxr did not train (`covidcxr.evaluate.foreign_model`):

1. the collection is read by a source adapter, copies and near-duplicates linked from the
   pixels (`covidcxr.evaluate.external.read_collection`);
2. target 1 for the YAML's ``output.positive_label``, 0 for ``output.negative_labels``
   (default: every other label); other labels are listed as outside the task;
3. **what the model saw**: covidcxr did not train it, so it knows no training split. When
   the YAML names its ``training_manifest``, every image linked to it (patient, file hash,
   near-duplicate — `covidcxr.evaluate.external.linked_reasons`, the rule of ``evaluate RUN
   --data``) is excluded and listed, and its sources are the *seen* ones; otherwise nothing
   can be excluded, and ``evaluation.json`` says so under ``training_data``;
4. covidcxr's preprocessing as the YAML asks, through the content-keyed cache (refusals
   listed with the reason), then the model, chunk by chunk, each chunk flushed atomically
   (a rerun with the same model file and YAML skips what is done);
5. per-source metrics with intervals, seen vs unseen
   (`covidcxr.evaluate.cross_source.evaluate_predictions`, the body of every evaluation).

Results go to the folder the user names (default ``./covidcxr-external/<model name>/``), in
the layout and JSON shape of ``RUN/external/<name>/``.

Example::

    >>> report = evaluate_foreign("models/my-model.yaml", "../shared/data/cxr")   # doctest: +SKIP
    >>> report["per_source"]["nih"]["auc"], report["training_data"]["known"]        # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.manifest import is_missing
from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.cross_source import evaluate_predictions
from covidcxr.evaluate.external import EXCLUDED, PREDICTIONS, REJECTED, linked_reasons, read_collection, score_chunks, write_evaluation
from covidcxr.io.atomic import atomic_path
from covidcxr.evaluate.foreign_model import ForeignModel, load_foreign_model
from covidcxr.preprocess.pipeline import PreprocessConfig
from covidcxr.rundir import SeenData

__all__ = ["DEFAULT_CACHE_DIR", "default_out", "evaluate_foreign", "foreign_inputs", "foreign_rows", "training_data", "training_rows"]

#: the preprocessing cache of a foreign model's inputs (the recipes' default)
DEFAULT_CACHE_DIR = ".cache/covidcxr"
NO_TRAINING_DATA = (
    "the model's training data are unknown (MODEL.yaml names no training_manifest): no image could be excluded as linked "
    "to what it was trained on, and every source counts as unseen; images it saw in training would flatter these numbers"
)


def _say_nothing(_message: str) -> None:
    return None


def default_out(model_name: str) -> Path:
    """``./covidcxr-external/<model name>/``."""
    return Path("covidcxr-external") / model_name


def training_data(model: ForeignModel) -> tuple[SeenData | None, dict[str, Any]]:
    """What the foreign model was trained on: its ``training_manifest`` (train/val rows), or nothing known.

    Returns:
        ``(seen, facts)``: `SeenData` (None when no manifest is given) and the JSON-ready
        ``training_data`` entry (``known``, ``manifest``, ``n_images``, ``sources``, ``note``).

    Raises:
        CovidCXRError: the manifest cannot be read (naming it and why).
    """
    from covidcxr.data.manifest import read_manifest

    spec = model.spec
    if not spec.training_manifest:
        sources = sorted(spec.training_sources or [])
        note = NO_TRAINING_DATA + (f"; the YAML says it was trained on {', '.join(sources)} (marked seen, nothing excluded)" if sources else "")
        return None, {"known": False, "manifest": None, "n_images": None, "sources": sources, "note": note}
    path = Path(spec.training_manifest)
    path = path if path.is_absolute() else (model.yaml_path.parent / path)
    try:
        rows = read_manifest(path)
    except CovidCXRError as exc:
        raise CovidCXRError(f"--model {model.yaml_path}: field 'training_manifest': {exc}") from None
    note = "every image linked to the training manifest (patient, file hash, path, near-duplicate) was excluded"
    if "split" in rows.columns:  # a run's manifest: its test rows were not trained on
        rows = rows[rows["split"].astype(str).isin(["train", "val"])].reset_index(drop=True)
        note += " (its train and val rows)"
    sources = sorted(rows["source"].astype(str).unique().tolist())
    return SeenData(rows=rows, sources=sources), {"known": True, "manifest": str(path), "n_images": int(len(rows)), "sources": sources, "note": note}


def training_rows(seen: SeenData | None, positive_label: str) -> pd.DataFrame:
    """The model's training rows (``split == "train"`` when the manifest has splits) with ``target``; empty when unknown.

    They feed the source-only and metadata-only baselines and the training label mix.
    """
    if seen is None:
        return pd.DataFrame()
    rows = seen.rows[seen.rows["split"].astype(str) == "train"] if "split" in seen.rows.columns else seen.rows
    return rows.assign(target=(rows["label"].astype(str) == positive_label).astype(np.int64)).reset_index(drop=True)


def foreign_rows(manifest: pd.DataFrame, model: ForeignModel) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows the model's task scores (with ``target``) and the others (with ``reason``)."""
    out = model.spec.output
    labels = manifest["label"].astype(str)
    positive = labels == out.positive_label
    negative = labels.isin(out.negative_labels) if out.negative_labels is not None else ~positive
    if not positive.any():
        raise CovidCXRError(f"no image is labelled {out.positive_label!r} (the model's output.positive_label); labels found: {sorted(labels.unique())}")
    rows = manifest[positive | negative].assign(target=positive[positive | negative].astype(np.int64)).reset_index(drop=True)
    outside = manifest[~(positive | negative)].copy()
    outside["reason"] = [f"label {label!r} is neither the model's positive label nor one of its negative_labels" for label in outside["label"]]
    return rows, outside


def foreign_inputs(rows: pd.DataFrame, config: PreprocessConfig, cache_dir: str | Path = DEFAULT_CACHE_DIR, workers: int | None = None, progress: bool = False) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, pd.DataFrame]:
    """Model inputs and lung masks of ``rows`` through covidcxr's preprocessing cache.

    The foreign-model counterpart of `covidcxr.train.inference.cached_inputs` (which takes a
    run's recipe): `covidcxr.preprocess.cache.preprocess_collection` with the model's
    `PreprocessConfig` (screening included), then each entry read back.

    Returns:
        ``(kept, images, lung_masks, refused)``: usable rows (index 0..n-1), ``(n, H, W)``
        float32 in [0, 1], ``(n, H, W)`` bool, and the refused rows (``image``, ``source``,
        ``reason``).
    """
    from covidcxr.preprocess.cache import config_dir, entry_path, preprocess_collection, read_entry

    result = preprocess_collection(rows.reset_index(drop=True), config, cache_dir, workers=workers, progress=progress)
    index = result.index
    rejected = index["rejected_reason"].map(lambda v: not is_missing(v)).to_numpy()
    refused = pd.DataFrame({
        "image": index.loc[rejected, "image"].astype(str).to_numpy(),
        "source": index.loc[rejected, "source"].astype(str).to_numpy(),
        "reason": index.loc[rejected, "rejected_reason"].astype(str).to_numpy(),
    })
    used = index[~rejected].reset_index(drop=True)
    directory = config_dir(cache_dir, config)
    images = np.zeros((len(used), *config.size), dtype=np.float32)
    masks = np.zeros((len(used), *config.size), dtype=bool)
    for i, key in enumerate(used["cache_key"].astype(str)):
        entry = read_entry(entry_path(directory, key))
        images[i], masks[i] = entry.image, entry.lung_mask
    keep = [c for c in rows.columns if c in used.columns]
    return used[keep].reset_index(drop=True), images, masks, refused


def _scorer(model: ForeignModel, cache_dir: str | Path, workers: int | None, progress: bool) -> Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]:
    def predict(part: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        kept, images, _, refused = foreign_inputs(part, model.preprocess_config(), cache_dir, workers, progress)
        return kept.assign(probability=model.predict(images) if len(kept) else np.zeros(0)), refused

    return predict


def _exclusions(rows: pd.DataFrame, outside: pd.DataFrame, seen: SeenData | None, facts: dict[str, Any], progress: bool, say: Callable[[str], None]) -> tuple[np.ndarray, pd.DataFrame]:
    """``(linked (N,) bool, excluded rows with reason)``: images linked to the training manifest (none when unknown) and those outside the task."""
    if seen is None:
        say("the model's training data are unknown: nothing can be excluded as linked (say `training_manifest:` in the YAML)")
        reasons = pd.Series([""] * len(rows), dtype=object)
    else:
        say(f"{len(rows)} images fit the task; checking links to the {len(seen.rows)} training/validation images of {facts['manifest']}")
        reasons = linked_reasons(rows, seen, progress=progress, say=say)
    linked = (reasons != "").to_numpy()
    excluded = pd.concat([rows[linked].assign(reason=reasons[linked].to_numpy()), outside], ignore_index=True)
    return linked, excluded.reindex(columns=["image", "source", "label", "patient_id", "reason"])


def evaluate_foreign(
    model_yaml: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    adapter: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 512,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> dict[str, Any]:
    """Score a foreign model on a collection, linked images excluded when its training data are known.

    Args:
        model_yaml: the ``MODEL.yaml`` (`covidcxr.evaluate.foreign_model`).
        data: the collection folder (any layout a source adapter reads).
        out: the results folder (default `default_out`: ``./covidcxr-external/<name>/``).
        adapter: the source adapter (default: detected).
        n_boot, seed: the bootstrap behind the within-source and source-only intervals.
        chunk: images per flushed chunk.
        cache_dir: the preprocessing cache.
        workers: preprocessing processes (None: every core).

    Returns:
        The ``evaluation.json`` content, in the shape of ``evaluate RUN --data``'s: ``model``,
        ``data``, ``name``, ``predictions``, ``per_source`` ({source: {n_images, n_patients,
        auc: {estimate, low, high}, ...}}), ``seen_unseen``, ``overall``, ``within_source``,
        ``source_only``, ``threshold``, ``excluded``, ``rejected``, plus ``training_data``
        (whether anything could be excluded, and why not) and ``out``.

    Raises:
        CovidCXRError: a bad MODEL.yaml, not a collection, nothing left to score.
    """
    started = time.perf_counter()
    model = load_foreign_model(model_yaml)
    out = Path(out) if out is not None else default_out(model.name)
    data = Path(data)
    say(f"{model.describe()}")
    say(f"reading {data} and linking its copies")
    manifest, refused_by_adapter = read_collection(data, adapter, progress)
    try:
        rows, outside = foreign_rows(manifest, model)
    except CovidCXRError as exc:
        raise CovidCXRError(f"--data {data}: {exc}") from None
    seen, facts = training_data(model)
    linked, excluded = _exclusions(rows, outside, seen, facts, progress, say)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EXCLUDED) as tmp:
        excluded.to_csv(tmp, index=False)
    candidates = rows[~linked].reset_index(drop=True).assign(split="external")
    if candidates.empty:
        raise CovidCXRError(f"--data {data}: every image of the task is linked to the model's training data (see {out / EXCLUDED})")
    scored, rejected = score_chunks(candidates, out, model.fingerprint(), _scorer(model, cache_dir, workers, progress), chunk=chunk, say=say)
    scored = scored[scored["image"].astype(str).isin(set(candidates["image"].astype(str)))].reset_index(drop=True)
    if scored.empty:
        raise CovidCXRError(f"--data {data}: the preprocessing refused every image (see {out / REJECTED})")
    seen_sources = facts["sources"]
    scored["seen"] = scored["source"].astype(str).isin(seen_sources)
    with atomic_path(out / PREDICTIONS) as tmp:
        scored.to_parquet(tmp, index=False)
    train_rows = training_rows(seen, model.positive_label)
    report = {
        "run": None,  # the keys of `evaluate RUN --data`'s report: no run here, a foreign model
        "run_dir": None,
        "model": model.describe(),
        "model_yaml": str(model_yaml),
        "model_name": model.name,
        "data": str(data),
        "name": model.name,
        "out": str(out),
        "adapter": adapter,
        "predictions": PREDICTIONS,
        "positive_label": model.positive_label,
        **evaluate_predictions(scored, train_rows, seen_sources, model.threshold, n_boot, seed),
        "operating_point": {"threshold": model.threshold, "describe": f"threshold {model.threshold:g} from the MODEL.yaml (output.threshold)"},
        "training_data": facts,
        "n_candidates": int(len(rows) + len(outside)),
    }
    return write_evaluation(out, report, excluded, rejected, refused_by_adapter, n_boot, seed, started)
