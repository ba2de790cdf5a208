"""`covidcxr audit RUN`: the whole shortcut audit of one trained run, written to ``RUN/audit/``.

Steps (each a module; the numbers they produce are in ``audit.json``):

1. the run's val + test images — and every image of the unseen sources it was tested on
   (``predictions.parquet`` rows with ``test_set = "unseen_source"``) — through the run's own
   preprocessing cache (`covidcxr.train.inference.cached_inputs`); never its training images;
2. cross-source evaluation (`covidcxr.evaluate.cross_source.evaluate_run`): the skill gate's
   AUC, per-source metrics, seen vs unseen (domain shift), within-source AUC over the seen
   sources, the source-only baseline;
3. lung ablation on the seen sources' test split (`ablation.py`): AUC with the lungs blanked
   and with only the lungs;
4. intensity-window perturbation on the same images, and whether their outside-lung
   intensities alone predict the label within a source (`intensity.py`);
5. confounders beyond the source on the same images (`covidcxr.evaluate.subgroups`):
   metrics by view, sex and age band, a metadata-only baseline, the score's dependence on
   the view within a label; and the training sources' label mix;
6. source probe on the embeddings of every audited image (seen and unseen sources) of the
   original, lungs-blanked and lungs-only inputs (`probe.py`);
7. Grad-CAM lung focus on the test images, per source and label, and a gallery (`saliency.py`);
8. t-SNE of every audited image's embedding by source and by label (`embedding.py`);
9. plain-language findings and the verdict (`findings.py`), most severe first.

Layout of ``RUN/audit/``: ``audit.json``, ``lung_focus.parquet``, ``embedding.parquet``,
``gallery.png``, ``embedding.png`` (all written atomically; a rerun replaces them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.audit import AUDIT_DIR, AUDIT_FILE
from covidcxr.audit.ablation import blank_lungs, keep_lungs_only, lung_ablation
from covidcxr.audit.embedding import EMBEDDING_METHODS, embedding_map, plot_embedding, require_umap
from covidcxr.audit.findings import derive_findings, verdict
from covidcxr.audit.intensity import intensity_perturbation, label_from_intensity_of_run
from covidcxr.audit.probe import source_probe
from covidcxr.audit.saliency import gallery_captions, gradcam, lung_focus_report, plot_gallery, saliency_layer, select_gallery
from covidcxr.errors import CovidCXRError
from covidcxr.evaluate import subgroups
from covidcxr.evaluate.cross_source import evaluate_run, json_ready, training_sources
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.rundir import RunDir
from covidcxr.train.inference import cached_inputs, load_run

__all__ = ["AUDIT_DIR", "AUDIT_FILE", "audit_run", "read_audit"]


def _say_nothing(_message: str) -> None:
    return None


def _subsample_by_patient(rows: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_images`` rows, whole patients kept together, stratified by split and source."""
    if max_images is None or len(rows) <= max_images:
        return rows
    rng = np.random.default_rng(seed)
    patients = rows["patient_id"].astype(str).unique()
    order = rng.permutation(len(patients))
    keep: set[str] = set()
    count = 0
    sizes = rows.groupby(rows["patient_id"].astype(str)).size()
    for index in order:
        patient = patients[index]
        if count + int(sizes[patient]) > max_images:
            continue
        keep.add(patient)
        count += int(sizes[patient])
    return rows[rows["patient_id"].astype(str).isin(keep)]


def _unseen_rows(run: Any, columns: list[str]) -> tuple[pd.DataFrame, str | None]:
    """Manifest rows of the unseen-source test images in ``predictions.parquet`` (and a note when unavailable)."""
    predictions_file = run.run_dir / "predictions.parquet"
    if not predictions_file.is_file():
        return pd.DataFrame(columns=columns), None
    predictions = pd.read_parquet(predictions_file)
    if "test_set" not in predictions.columns or not (predictions["test_set"] == "unseen_source").any():
        return pd.DataFrame(columns=columns), None
    wanted = set(predictions.loc[predictions["test_set"] == "unseen_source", "image"].astype(str))
    from covidcxr.experiments.testsets import task_rows

    try:
        collection = task_rows(run.recipe)
    except CovidCXRError as exc:
        return pd.DataFrame(columns=columns), f"unseen-source images not audited: {exc}"
    unseen = collection[collection["image"].astype(str).isin(wanted)].assign(split="test")
    return unseen[[c for c in columns if c in unseen.columns]], None


def _stored_or_predicted(run: Any, kept: pd.DataFrame, images: np.ndarray) -> np.ndarray:
    """``(N,)`` probabilities: the run's own answer (``predictions.parquet``) where it has one, else predicted now.

    One answer per image: the audit's evaluation reads the stored predictions, so its
    subgroups, metadata and view findings read the same ones (re-predicting differs by
    ~1e-6 — mixed precision at training — and the two would then disagree). Images the run
    never scored (an unseen source's, in an older run) are predicted.
    """
    predicted = run.predict(images)
    stored_file = RunDir(run.run_dir).predictions
    if not stored_file.is_file():
        return predicted
    stored = RunDir(run.run_dir).read_predictions()
    if not {"image", "probability"} <= set(stored.columns):
        return predicted
    stored = stored.drop_duplicates("image")
    lookup = pd.Series(stored["probability"].to_numpy(dtype=np.float64), index=stored["image"].astype(str))
    found = kept["image"].astype(str).map(lookup)
    return np.where(found.notna().to_numpy(), found.to_numpy(dtype=np.float64, na_value=np.nan), predicted.reshape(-1))


def _saliency(run: Any, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray]:
    """Grad-CAM lung focus of ``images``: the summary, the per-image table and the maps."""
    layer = saliency_layer(run)
    maps = gradcam(run, images, layer=layer)
    summary, focus = lung_focus_report(maps, masks, rows, "Grad-CAM (MONAI), positive logit", layer=layer)
    return summary, focus, maps


def _probe_all(run: Any, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, embeddings: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    sources, patients = rows["source"].to_numpy(), rows["patient_id"].to_numpy()
    fill = float(run.recipe.preprocess.pad_value)
    probe: dict[str, Any] = {"full": source_probe(embeddings, sources, patients, n_boot=n_boot, seed=seed)}
    if str(run.recipe.preprocess.lungs) == "mask":
        probe["lungs_blanked"] = {"skipped": "the run's preprocessing masks the lungs: outside-lung pixels never reach the model"}
    else:
        probe["lungs_blanked"] = source_probe(run.embed(blank_lungs(images, masks, fill)), sources, patients, n_boot=n_boot, seed=seed)
    probe["lungs_only"] = source_probe(run.embed(keep_lungs_only(images, masks, fill)), sources, patients, n_boot=n_boot, seed=seed)
    return probe


def audit_run(
    run_dir: str | Path,
    n_boot: int = 1000,
    seed: int = 0,
    gallery_per_group: int = 2,
    max_images: int | None = 2000,
    write: bool = True,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
    embedding: str = "tsne",
) -> dict[str, Any]:
    """Audit one binary run for shortcut learning.

    Args:
        run_dir: a run directory (for k-fold runs: one ``fold-k``).
        n_boot: patient-bootstrap resamples behind every CI.
        seed: seed of the bootstrap, the probe's folds and t-SNE.
        gallery_per_group: overlays per (source, label) in the gallery.
        max_images: cap on the val + test images audited (whole patients are sampled).
        write: write ``RUN/audit/`` (and ``RUN/evaluation.json``).
        progress: show the preprocessing progress bar.
        say: called with one line per step (the CLI prints them).
        embedding: the embedding map's method, ``tsne`` or ``umap`` (umap-learn, optional;
            `covidcxr.audit.embedding.embedding_map`).

    Returns:
        The ``audit.json`` content: ``run``, ``verdict`` (``no_skill``, ``shortcut``,
        ``warning`` or ``ok``), ``findings``, ``evaluation`` (the cross-source report),
        ``ablation``, ``intensity``, ``intensity_baseline``, ``confounders`` (``subgroups``, ``metadata_only``,
        ``view_dependence``), ``label_mix``, ``source_probe``, ``saliency``, ``embedding``,
        ``sources`` / ``training_sources`` / ``unseen_sources``, counts and settings.

    Raises:
        CovidCXRError: not a run directory, a multi-class run, no val/test images.
    """
    started = time.perf_counter()
    if embedding not in EMBEDDING_METHODS:  # before the costly steps
        raise CovidCXRError(f"embedding must be one of {list(EMBEDDING_METHODS)}; got {embedding!r}")
    if embedding == "umap":
        require_umap()
    run = load_run(run_dir)
    if not run.binary:
        raise CovidCXRError(f"{run.run_dir}: the audit scores a binary run (AUC of the positive class); this run has classes {run.classes}")
    rd = RunDir(run.run_dir)
    manifest_file = rd.manifest
    manifest = rd.read_manifest()
    rows = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    if rows.empty or not (rows["split"] == "test").any():
        raise CovidCXRError(f"{manifest_file}: no test images to audit")
    unseen, unseen_note = _unseen_rows(run, list(rows.columns))
    rows = _subsample_by_patient(pd.concat([rows, unseen], ignore_index=True), max_images, seed).reset_index(drop=True)
    lungs_mode = str(run.recipe.preprocess.lungs)
    seen_sources = training_sources(run.run_dir)

    say(f"audit {run.name}: {len(rows)} val + test images ({len(unseen)} of unseen sources) through the run's preprocessing")
    kept, images, lung_masks, excluded = cached_inputs(rows, run.recipe, progress=progress)
    if kept.empty:
        raise CovidCXRError(f"{run.run_dir}: every val/test image was rejected by the preprocessing")
    kept["probability"] = _stored_or_predicted(run, kept, images)
    is_test = (kept["split"] == "test").to_numpy()
    seen_test = is_test & kept["source"].astype(str).isin(seen_sources).to_numpy()
    test_rows, seen_rows = kept[is_test].reset_index(drop=True), kept[seen_test].reset_index(drop=True)
    train_rows = manifest[manifest["split"] == "train"]

    say("cross-source evaluation (skill, per source, seen/unseen, within-source AUC over seen sources, source-only baseline)")
    evaluation = evaluate_run(run.run_dir, threshold=run.threshold, n_boot=n_boot, seed=seed, write=write)

    say(f"lung ablation and intensity-window perturbation on {int(seen_test.sum())} test images of the training sources")
    ablation = lung_ablation(run, images[seen_test], lung_masks[seen_test], seen_rows, n_boot=n_boot, seed=seed)
    intensity = intensity_perturbation(run, images[seen_test], seen_rows, n_boot=n_boot, seed=seed, lung_masks=lung_masks[seen_test])
    intensity_baseline = label_from_intensity_of_run(run, images[seen_test], lung_masks[seen_test], seen_rows, n_boot=n_boot, seed=seed)

    say("confounders beyond the source: view, sex, age band; metadata-only baseline; view dependence within a label")
    confounders = subgroups.confounders(seen_rows, train_rows, threshold=run.threshold, n_boot=n_boot, seed=seed)
    mix = subgroups.label_mix(train_rows)

    say("source probe on the embeddings (original, lungs blanked, lungs only)")
    embeddings = run.embed(images)
    probe = _probe_all(run, images, lung_masks, kept, embeddings, n_boot, seed)

    say(f"Grad-CAM and lung focus on {int(is_test.sum())} test images")
    saliency, focus, maps = _saliency(run, images[is_test], lung_masks[is_test], test_rows)

    say(f"{EMBEDDING_METHODS[embedding]} of the embeddings (every audited source)")
    coordinates = embedding_map(embeddings, embedding, seed=seed) if len(embeddings) >= 5 else None

    findings = derive_findings(evaluation, ablation, probe, saliency, lungs_mode, label_mix=mix, confounders=confounders, intensity=intensity, intensity_baseline=intensity_baseline)
    report = {
        "run": run.name,
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "model": run.model_description,
        "threshold": run.threshold,
        "operating_point": run.operating_point.to_dict() if run.operating_point is not None else None,
        "split": "test",
        "n_images": int(is_test.sum()),
        "n_patients": int(test_rows["patient_id"].nunique()),
        "n_images_probe": int(len(kept)),
        "n_excluded": int(len(excluded)),
        "sources": sorted(kept["source"].astype(str).unique().tolist()),
        "training_sources": seen_sources,
        "unseen_sources": sorted(set(kept["source"].astype(str)) - set(seen_sources)),
        "unseen_note": unseen_note,
        "preprocess_lungs": lungs_mode,
        "verdict": verdict(findings),
        "findings": findings,
        "evaluation": evaluation,
        "ablation": ablation,
        "intensity": intensity,
        "intensity_baseline": intensity_baseline,
        "confounders": confounders,
        "label_mix": mix,
        "source_probe": probe,
        "saliency": saliency,
        "embedding": {"method": embedding, "figure": "embedding.png", "table": "embedding.parquet"} if coordinates is not None else {"skipped": "fewer than 5 images"},
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": None,
    }
    if write:
        _write_outputs(run, report, focus, maps, images[is_test], lung_masks[is_test], kept, coordinates, gallery_per_group)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report = json_ready(report)
    if write:
        atomic_write_text(rd.audit_file, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _write_outputs(run: Any, report: dict[str, Any], focus: pd.DataFrame, maps: np.ndarray, images: np.ndarray, masks: np.ndarray, kept: pd.DataFrame, coordinates: np.ndarray | None, gallery_per_group: int) -> None:
    """``RUN/audit/``: lung_focus.parquet, gallery.png, embedding.parquet + .png (audit.json is written last)."""
    out = run.run_dir / AUDIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "lung_focus.parquet") as tmp:
        focus.to_parquet(tmp, index=False)
    gallery = select_gallery(focus.reset_index(drop=True), gallery_per_group)
    if gallery:
        captions, correct = gallery_captions(focus.iloc[gallery], run.threshold, run.classes[-1], run.classes[0])
        plot_gallery(images[gallery], maps[gallery], masks[gallery], captions, out / "gallery.png", correct=correct)
        report["saliency"]["gallery"] = "gallery.png"
    if coordinates is not None:
        table = kept[["source", "label", "target", "split"]].copy()
        table["seen"] = table["source"].astype(str).isin(report["training_sources"])
        table["x"], table["y"] = coordinates[:, 0], coordinates[:, 1]
        with atomic_path(out / "embedding.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        plot_embedding(table, out / "embedding.png", title=f"{run.name}: val + test embeddings (seen and unseen sources)", training_sources=report["training_sources"], method=report["embedding"]["method"])


def read_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/audit/audit.json`` if the run was audited, else None."""
    return RunDir(run_dir).read_audit()
