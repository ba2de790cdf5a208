"""The shortcut audit without a run's own test split: on a new collection, or from predictions alone.

Two entry points beside `covidcxr.audit.run.audit_run`:

* :func:`audit_external` — ``covidcxr audit RUN --data DIR``: the run scored on another
  collection (`covidcxr.evaluate.external.evaluate_external`: linked images excluded,
  resumable), then every prediction-based finding on those scores and the lung ablation on
  those images; written to ``RUN/external/<name>/audit/audit.json``.
* :func:`audit_predictions` — ``covidcxr audit --predictions PRED.csv --data DIR``: someone's
  scores (columns ``image`` as in the collection's manifest and ``probability``; optional
  ``split``) joined to the collection's labels and metadata, and every finding that needs only
  scores, labels and metadata: the skill gate, per source, seen vs unseen, within-source AUC,
  the source-only baseline, subgroups, the metadata-only baseline, view dependence. The
  numbers come from the same functions, on the same rows, as the run-based audit's
  (`covidcxr.evaluate.cross_source.evaluate_predictions`, `covidcxr.evaluate.subgroups`), so the
  same scores give the same numbers (tested).

Findings that need the model itself (lung ablation, the intensity perturbation, the source
probe, saliency) are listed under ``not_available`` with the reason, never silently absent.

Example::

    >>> report = audit_predictions("preds.csv", "../shared/data/cxr", training_sources=["cohen", "kermany"])  # doctest: +SKIP
    >>> report["verdict"], report["evaluation"]["per_source"]["nih"]["auc"]                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.audit.findings import derive_findings, verdict
from covidcxr.errors import CovidCXRError
from covidcxr.evaluate import subgroups
from covidcxr.evaluate.cross_source import evaluate_predictions, json_ready
from covidcxr.io.atomic import atomic_write_text

__all__ = ["NEEDS_THE_MODEL", "audit_external", "audit_predictions", "read_predictions_csv", "scored_audit"]

#: findings a predictions file cannot give, and why.
NEEDS_THE_MODEL = {
    "lung_ablation": "re-predicting with the lungs blanked / only the lungs needs the model",
    "intensity": "the intensity-window perturbation re-predicts altered images: needs the model",
    "source_probe": "the source probe reads the model's embeddings",
    "saliency": "saliency maps need the model",
}


def _say_nothing(_message: str) -> None:
    return None


def scored_audit(test: pd.DataFrame, train_rows: pd.DataFrame, seen_sources: Sequence[str], threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    """The prediction-based parts of an audit: evaluation, confounders and the training label mix.

    Args:
        test: ``(N,)`` scored test rows (``source, patient_id, target, probability`` + ``view, sex, age``).
        train_rows: the training rows (``source, target`` + metadata); empty when unknown.
        seen_sources: the training sources.

    Returns:
        ``{"evaluation", "confounders", "label_mix"}`` — the confounders on the seen sources'
        rows, as `covidcxr.audit.run.audit_run` computes them.
    """
    evaluation = evaluate_predictions(test, train_rows, seen_sources, threshold, n_boot, seed)
    seen_rows = test[test["source"].astype(str).isin({str(s) for s in seen_sources})].reset_index(drop=True)
    confounders = subgroups.confounders(seen_rows, train_rows, threshold=threshold, n_boot=n_boot, seed=seed) if len(seen_rows) else None
    mix = subgroups.label_mix(train_rows) if len(train_rows) else None
    return {"evaluation": evaluation, "confounders": confounders, "label_mix": mix}


# ------------------------------------------------------------------------------- predictions only


def read_predictions_csv(path: str | Path, manifest: pd.DataFrame, root: Path) -> pd.DataFrame:
    """A predictions CSV joined to the collection's manifest rows (labels, patients, metadata).

    Args:
        path: CSV with ``image`` (as in the collection's manifest: relative to its folder, or
            absolute) and ``probability`` in [0, 1]; optional ``split`` (``train``, ``val``,
            ``test``; default ``test``) — ``train`` rows may leave ``probability`` empty; a
            ``status`` column (`covidcxr predict --csv`) leaves out the rows not ``predicted``
            (counted in the report's ``n_not_scored``).
        manifest: the collection's manifest (absolute ``image`` paths).
        root: the collection folder (relative ``image`` values are resolved against it).

    Returns:
        The manifest rows with ``probability`` and ``split``, in the CSV's order.

    Raises:
        CovidCXRError: a missing column, an image not in the collection, a duplicate image, a
            probability that is not a number in [0, 1] — naming the row.
    """
    path = Path(path)
    if not path.is_file():
        raise CovidCXRError(f"--predictions {path}: no such file (expected a CSV with columns image, probability)")
    try:
        frame = pd.read_csv(path, dtype={"image": str, "split": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CovidCXRError(f"--predictions {path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("image", "probability") if c not in frame.columns]
    if missing:
        raise CovidCXRError(f"--predictions {path}: missing column(s) {', '.join(missing)} (expected image, probability[, split])")
    frame["_line"] = np.arange(len(frame)) + 2  # the CSV's line number, for messages
    if "status" in frame.columns:  # `covidcxr predict --csv`: refused files carry no probability
        refused = frame["status"].astype(str) != "predicted"
        frame = frame[~refused].reset_index(drop=True)
        frame.attrs["not_scored"] = int(refused.sum())
    split = frame["split"].fillna("test").str.strip().str.lower() if "split" in frame.columns else pd.Series(["test"] * len(frame))
    bad_split = ~split.isin(["train", "val", "test"])
    if bad_split.any():
        row = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise CovidCXRError(f"--predictions {path} row {frame['_line'].iloc[row]}: split {split.iloc[row]!r}; expected train, val or test")
    probability = pd.to_numeric(frame["probability"], errors="coerce")
    needs = split.isin(["val", "test"]).to_numpy()
    bad = needs & ~(probability.between(0.0, 1.0).to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CovidCXRError(f"--predictions {path} row {frame['_line'].iloc[row]}: probability {frame['probability'].iloc[row]!r}; expected a number in [0, 1]")
    key = frame["image"].map(lambda p: _image_key(str(p), root))
    duplicated = key.duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise CovidCXRError(f"--predictions {path} row {frame['_line'].iloc[row]}: image {frame['image'].iloc[row]!r} is listed twice")
    lookup = {str(Path(p).resolve()): i for i, p in enumerate(manifest["image"].astype(str))}
    unknown = [i for i, k in enumerate(key) if k not in lookup]
    if unknown:
        shown = ", ".join(f"row {frame['_line'].iloc[i]} ({frame['image'].iloc[i]})" for i in unknown[:5])
        raise CovidCXRError(f"--predictions {path}: {len(unknown)} image(s) not in the collection {root}: {shown} (expected paths as in its manifest)")
    rows = manifest.iloc[[lookup[k] for k in key]].reset_index(drop=True)
    rows["probability"] = probability.to_numpy(dtype=np.float64)
    rows["split"] = split.to_numpy()
    rows.attrs["not_scored"] = frame.attrs.get("not_scored", 0)
    return rows


def _image_key(image: str, root: Path) -> str:
    """An image path as the manifest has it: relative to the collection (as in its manifest.csv),
    else relative to the working directory (as `covidcxr predict DIR --csv` writes it), else absolute."""
    path = Path(image)
    if not path.is_absolute() and (root / path).exists():
        return str((root / path).resolve())
    return str(path.resolve())


def audit_predictions(
    predictions: str | Path,
    data: str | Path,
    training_sources: Sequence[str] | None = None,
    adapter: str | None = None,
    positive_label: str = "covid",
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Every finding that needs only scores, labels and metadata, for a CSV of someone's predictions.

    Args:
        predictions: the CSV (:func:`read_predictions_csv`).
        data: the collection the images belong to (labels, patients, view/sex/age).
        training_sources: the model's training sources (seen); default: the sources of the
            CSV's ``train``/``val`` rows, else none (every source is then unseen).
        positive_label: the label scored as positive (target 1); every other label is negative.
        threshold: the decision threshold (``probability >= threshold`` is positive).
        out: write ``audit.json`` there (a folder), when given.

    Returns:
        ``{verdict, findings, evaluation, confounders, label_mix, not_available, n_images,
        n_patients, training_sources, ...}``.
    """
    from covidcxr.data.sources import load_source

    started = time.perf_counter()
    root = Path(data)
    if not root.is_dir():
        raise CovidCXRError(f"--data {root}: not a folder (expected the collection the predictions were made on)")
    rows = read_predictions_csv(predictions, load_source(root, adapter).manifest, root)
    rows["target"] = (rows["label"].astype(str) == positive_label).astype(np.int64)
    test, train_rows = rows[rows["split"] == "test"].reset_index(drop=True), rows[rows["split"] == "train"].reset_index(drop=True)
    if test.empty:
        raise CovidCXRError(f"--predictions {predictions}: no test rows (rows without a split column, or split 'test')")
    if training_sources is None:
        training_sources = sorted(rows.loc[rows["split"].isin(["train", "val"]), "source"].astype(str).unique())
    parts = scored_audit(test, train_rows, list(training_sources), threshold, n_boot, seed)
    findings = derive_findings(parts["evaluation"], None, None, None, label_mix=parts["label_mix"], confounders=parts["confounders"])
    report = {
        "predictions": str(predictions),
        "data": str(root),
        "model": "predictions only",
        "threshold": float(threshold),
        "positive_label": positive_label,
        "split": "test",
        "n_images": int(len(test)),
        "n_patients": int(test["patient_id"].nunique()),
        "n_training_rows": int(len(train_rows)),
        "n_not_scored": int(rows.attrs.get("not_scored", 0)),
        "training_sources": sorted(str(s) for s in training_sources),
        "sources": sorted(test["source"].astype(str).unique().tolist()),
        "verdict": verdict(findings),
        "findings": findings,
        **parts,
        "not_available": dict(NEEDS_THE_MODEL, **({} if len(train_rows) else {"source_only": "needs the training rows (split 'train' in the CSV)", "metadata_only": "needs the training rows (split 'train' in the CSV)"})),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = json_ready(report)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "audit.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


# ------------------------------------------------------------------------------- a run on a new collection


def audit_external(
    run_dir: str | Path,
    data: str | Path,
    name: str | None = None,
    adapter: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> dict[str, Any]:
    """``covidcxr audit RUN --data DIR``: the prediction-based findings and the lung ablation on a new collection.

    The images are those `evaluate_external` scored (linked images excluded, the evaluation
    resumed when it was already done); their model inputs come from the run's preprocessing
    cache. Written to ``RUN/external/<name>/audit/audit.json``.

    Returns:
        ``{run, data, name, verdict, findings, evaluation, confounders, label_mix, ablation,
        not_available, n_images, n_patients, ...}``.
    """
    from covidcxr.audit.ablation import lung_ablation
    from covidcxr.evaluate.external import PREDICTIONS, evaluate_external, external_name
    from covidcxr.rundir import RunDir
    from covidcxr.train.inference import cached_inputs, load_run

    started = time.perf_counter()
    run = load_run(run_dir)
    if not run.binary:
        raise CovidCXRError(f"{run.run_dir}: the audit scores a binary run (AUC of the positive class); this run has classes {run.classes}")
    name = name or external_name(data)
    evaluation = evaluate_external(run.run_dir, data, name=name, adapter=adapter, n_boot=n_boot, seed=seed, progress=progress, say=say)
    rd = RunDir(run.run_dir)
    scored = pd.read_parquet(rd.external(name) / PREDICTIONS)
    manifest = rd.read_manifest()
    train_rows = manifest[manifest["split"] == "train"]
    parts = scored_audit(scored, train_rows, evaluation["training_sources"], run.threshold, n_boot, seed)
    say(f"lung ablation on the {len(scored)} scored images")
    kept, images, masks, refused = cached_inputs(scored.assign(split="external"), run.recipe, progress=progress)
    if len(refused):  # scored a moment ago through the same preprocessing: a refusal here is a bug
        raise CovidCXRError(f"{rd.external(name) / PREDICTIONS}: {len(refused)} scored images refused by the preprocessing now ({refused['reason'].iloc[0]})")
    ablation = lung_ablation(run, images, masks, kept, n_boot=n_boot, seed=seed)
    lungs_mode = str(run.recipe.preprocess.lungs)
    # the evaluation's sentences compare seen and unseen sources; here most are unseen, the
    # whole point of the exercise: the skill gate and per-source numbers are what count
    findings = derive_findings(parts["evaluation"], ablation, None, None, lungs_mode, label_mix=parts["label_mix"], confounders=parts["confounders"])
    report = {
        "run": run.name,
        "run_dir": str(run.run_dir),
        "data": str(data),
        "name": name,
        "model": run.model_description,
        "threshold": run.threshold,
        "split": "external",
        "n_images": int(len(scored)),
        "n_patients": int(scored["patient_id"].nunique()),
        "training_sources": evaluation["training_sources"],
        "sources": sorted(scored["source"].astype(str).unique().tolist()),
        "preprocess_lungs": lungs_mode,
        "verdict": verdict(findings),
        "findings": findings,
        **parts,
        "ablation": ablation,
        "not_available": {k: v for k, v in NEEDS_THE_MODEL.items() if k != "lung_ablation"} | {"note": "not run on an external collection (run `covidcxr audit RUN` for the full audit on its own split)"},
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = json_ready(report)
    out = rd.external(name) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
