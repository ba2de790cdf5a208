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

* :func:`audit_foreign` — ``covidcxr audit --model MODEL.yaml --data DIR``: a foreign ONNX or
  TorchScript model (`covidcxr.evaluate.foreign_model`) scored on the collection
  (`covidcxr.evaluate.foreign.evaluate_foreign`) and audited as a black box: the
  prediction-based findings, lung ablation and the intensity window by re-predicting,
  occlusion saliency (`covidcxr.audit.occlusion`) instead of Grad-CAM, the source probe on its
  embedding output or its scores; written to ``<out>/audit/audit.json``.

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

__all__ = ["FOREIGN_NOT_AVAILABLE", "NEEDS_THE_MODEL", "audit_external", "audit_foreign", "audit_predictions", "read_predictions_csv", "scored_audit"]

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
        ``{run, data, name, verdict, findings, evaluation, confounders, label_mix, ablation, intensity_baseline,
        not_available, n_images, n_patients, ...}``.
    """
    from covidcxr.audit.ablation import lung_ablation
    from covidcxr.audit.intensity import label_from_intensity_of_run
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
    say(f"lung ablation and the outside-lung intensity baseline on the {len(scored)} scored images")
    kept, images, masks, refused = cached_inputs(scored.assign(split="external"), run.recipe, progress=progress)
    if len(refused):  # scored a moment ago through the same preprocessing: a refusal here is a bug
        raise CovidCXRError(f"{rd.external(name) / PREDICTIONS}: {len(refused)} scored images refused by the preprocessing now ({refused['reason'].iloc[0]})")
    ablation = lung_ablation(run, images, masks, kept, n_boot=n_boot, seed=seed)
    intensity_baseline = label_from_intensity_of_run(run, images, masks, kept, n_boot=n_boot, seed=seed)
    lungs_mode = str(run.recipe.preprocess.lungs)
    # the evaluation's sentences compare seen and unseen sources; here most are unseen, the
    # whole point of the exercise: the skill gate and per-source numbers are what count
    findings = derive_findings(parts["evaluation"], ablation, None, None, lungs_mode, label_mix=parts["label_mix"], confounders=parts["confounders"], intensity_baseline=intensity_baseline)
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
        "intensity_baseline": intensity_baseline,
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


# ------------------------------------------------------------------------------- a foreign model


#: what the black-box audit of a foreign model cannot give, and why
FOREIGN_NOT_AVAILABLE = {
    "gradcam": "a foreign model gives no gradients: occlusion saliency (Zeiler & Fergus 2014) stands in for Grad-CAM",
}


def _occlusion_summary(model: Any, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, fill: float, max_images: int, seed: int) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray, np.ndarray]:
    """Occlusion lung focus on at most ``max_images`` images (drawn at random, seeded): summary, per-image table, maps, chosen positions."""
    from covidcxr.audit.occlusion import occlusion_saliency
    from covidcxr.audit.saliency import lung_focus_report

    chosen = np.arange(len(rows)) if len(rows) <= max_images else np.sort(np.random.default_rng(seed).choice(len(rows), max_images, replace=False))
    maps = occlusion_saliency(model.predict, images[chosen], fill=fill)
    summary, focus = lung_focus_report(
        maps,
        masks[chosen],
        rows.iloc[chosen],
        "occlusion (Zeiler & Fergus 2014): drop of the positive probability when a patch is set to the padding value",
        method_name="Occlusion saliency",
    )
    return summary, focus, maps, chosen


def _foreign_probe(model: Any, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, fill: float, masked: bool, n_boot: int, seed: int) -> dict[str, Any]:
    """The source probe on the model's embedding output (else its scores), of the original, lungs-blanked and lungs-only inputs."""
    from covidcxr.audit.ablation import blank_lungs, keep_lungs_only
    from covidcxr.audit.probe import source_probe

    sources, patients = rows["source"].to_numpy(), rows["patient_id"].to_numpy()
    reads = "the model's embedding output" if model.spec.output.embedding is not None else "the model's score (it exposes no embedding output)"
    probe: dict[str, Any] = {"reads": reads, "full": source_probe(model.embed(images), sources, patients, n_boot=n_boot, seed=seed)}
    if masked:
        probe["lungs_blanked"] = {"skipped": "the model's preprocessing masks the lungs: outside-lung pixels never reach it"}
    else:
        probe["lungs_blanked"] = source_probe(model.embed(blank_lungs(images, masks, fill)), sources, patients, n_boot=n_boot, seed=seed)
    probe["lungs_only"] = source_probe(model.embed(keep_lungs_only(images, masks, fill)), sources, patients, n_boot=n_boot, seed=seed)
    return probe


def _write_occlusion(audit_dir: Path, model: Any, saliency: dict[str, Any], focus: pd.DataFrame, maps: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
    """``lung_focus.parquet`` and the occlusion ``gallery.png`` (named in ``saliency``) under ``audit_dir``, atomically."""
    from covidcxr.audit.saliency import gallery_captions, plot_gallery, select_gallery
    from covidcxr.io.atomic import atomic_path

    audit_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(audit_dir / "lung_focus.parquet") as tmp:
        focus.to_parquet(tmp, index=False)
    gallery = select_gallery(focus, 2)
    if gallery:
        captions, correct = gallery_captions(focus.iloc[gallery], model.threshold, model.positive_label, "not " + model.positive_label)
        plot_gallery(images[gallery], maps[gallery], masks[gallery], captions, audit_dir / "gallery.png", correct=correct)
        saliency["gallery"] = "gallery.png"


def audit_foreign(
    model_yaml: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    adapter: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    max_saliency_images: int = 200,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> dict[str, Any]:
    """``covidcxr audit --model MODEL.yaml --data DIR``: the black-box audit of a foreign model.

    The model is scored on the collection (`covidcxr.evaluate.foreign.evaluate_foreign`,
    resumed when done), then:

    * every prediction-based finding (`scored_audit`: skill gate, per source, seen vs unseen,
      within-source AUC, source-only and metadata-only baselines, view dependence);
    * lung ablation by re-predicting with the lungs blanked and with only the lungs
      (`covidcxr.audit.ablation.ablate`);
    * the intensity-window perturbation outside the lungs (`covidcxr.audit.intensity`);
    * occlusion saliency with its lung focus instead of Grad-CAM
      (`covidcxr.audit.occlusion`; weak evidence, never OK on its own);
    * a source probe on the model's ``embedding`` output when the YAML names one, else on
      its scores (`covidcxr.audit.probe`).

    Written to ``<out>/audit/`` (``audit.json`` with ``verdict``, ``lung_focus.parquet``,
    ``gallery.png``), ``out`` defaulting to ``./covidcxr-external/<model name>/``.

    Returns:
        ``{model, data, verdict, findings, evaluation, confounders, label_mix, ablation,
        intensity, source_probe, saliency, training_data, not_available, n_images, n_patients, ...}``.
    """
    from types import SimpleNamespace

    from covidcxr.audit.ablation import ablate
    from covidcxr.audit.intensity import intensity_perturbation
    from covidcxr.evaluate.external import PREDICTIONS
    from covidcxr.evaluate.foreign import DEFAULT_CACHE_DIR, default_out, evaluate_foreign, foreign_inputs, training_data, training_rows
    from covidcxr.evaluate.foreign_model import load_foreign_model

    started = time.perf_counter()
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    model = load_foreign_model(model_yaml)
    out = Path(out) if out is not None else default_out(model.name)
    evaluate_foreign(model_yaml, data, out=out, adapter=adapter, n_boot=n_boot, seed=seed, cache_dir=cache_dir, workers=workers, progress=progress, say=say)
    scored = pd.read_parquet(out / PREDICTIONS)
    config = model.preprocess_config()
    kept, images, masks, refused = foreign_inputs(scored.drop(columns=["split"], errors="ignore").assign(split="external"), config, cache_dir, workers, progress)
    if len(refused):  # scored a moment ago through the same preprocessing: a refusal here is a bug
        raise CovidCXRError(f"{out / PREDICTIONS}: {len(refused)} scored images refused by the preprocessing now ({refused['reason'].iloc[0]})")
    seen, facts = training_data(model)
    train_rows = training_rows(seen, model.positive_label)
    parts = scored_audit(kept, train_rows, facts["sources"], model.threshold, n_boot, seed)
    fill, masked = float(config.pad_value), config.lungs == "mask"
    say(f"lung ablation on the {len(kept)} scored images (re-predicted with the lungs blanked / only the lungs)")
    ablation = ablate(model.predict, images, masks, kept, threshold=model.threshold, fill=fill, masked=masked, n_boot=n_boot, seed=seed)
    # `intensity_perturbation` reads predict, threshold and the preprocessing's equalization/lungs
    # of a run; a foreign model offers the same three facts
    as_run = SimpleNamespace(predict=model.predict, threshold=model.threshold, recipe=SimpleNamespace(preprocess=config))
    intensity = intensity_perturbation(as_run, images, kept, n_boot=n_boot, seed=seed, lung_masks=masks)  # type: ignore[arg-type]
    say("source probe on the " + ("embedding output" if model.spec.output.embedding is not None else "scores (no embedding output)"))
    probe = _foreign_probe(model, images, masks, kept, fill, masked, n_boot, seed)
    say(f"occlusion saliency on {min(len(kept), max_saliency_images)} images")
    saliency, focus, maps, chosen = _occlusion_summary(model, images, masks, kept, fill, max_saliency_images, seed)
    findings = derive_findings(parts["evaluation"], ablation, probe, saliency, str(config.lungs), label_mix=parts["label_mix"], confounders=parts["confounders"], intensity=intensity)
    if not facts["known"] and not facts["sources"]:  # "never seen in training" is then an assumption: say so
        findings = [{**f, "text": f["text"] + " (The model's training data are unknown: every source is counted as unseen.)"} if f["id"] == "unseen_sources" else f for f in findings]
    audit_dir = out / "audit"
    _write_occlusion(audit_dir, model, saliency, focus, maps, images[chosen], masks[chosen])
    report = {
        "model": model.describe(),
        "model_yaml": str(model_yaml),
        "model_name": model.name,
        "data": str(data),
        "name": model.name,
        "out": str(out),
        "threshold": model.threshold,
        "split": "external",
        "n_images": int(len(kept)),
        "n_patients": int(kept["patient_id"].nunique()),
        "training_sources": facts["sources"],
        "training_data": facts,
        "sources": sorted(kept["source"].astype(str).unique().tolist()),
        "preprocess_lungs": str(config.lungs),
        "verdict": verdict(findings),
        "findings": findings,
        **parts,
        "ablation": ablation,
        "intensity": intensity,
        "source_probe": probe,
        "saliency": saliency,
        "not_available": dict(FOREIGN_NOT_AVAILABLE) | ({} if len(train_rows) else {"source_only": "the model's training rows are unknown (no training_manifest in the MODEL.yaml)", "metadata_only": "the model's training rows are unknown (no training_manifest in the MODEL.yaml)"}),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = json_ready(report)
    atomic_write_text(audit_dir / "audit.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
