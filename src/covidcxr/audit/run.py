"""`covidcxr audit RUN`: the whole shortcut audit of one trained run, written to ``RUN/audit/``.

Steps (each a module of this package; the numbers they produce are in ``audit.json``):

1. the run's val + test images through the run's own preprocessing cache
   (`covidcxr.train.inference.cached_inputs`) — never its training images, which the
   model has memorised;
2. cross-source evaluation (`covidcxr.evaluate.cross_source.evaluate_run`): per-source
   metrics, seen vs unseen, within-source AUC, the source-only baseline;
3. lung ablation on the test split (`ablation.py`): AUC with the lungs blanked and with
   only the lungs;
4. source probe on val + test embeddings of the original, lungs-blanked and lungs-only
   images (`probe.py`);
5. Grad-CAM lung focus on the test split, per source and label, and an overlay gallery
   (`saliency.py`);
6. t-SNE of the embeddings by source and by label (`embedding.py`);
7. plain-language findings (`findings.py`), most severe first.

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
from covidcxr.audit.embedding import plot_embedding, tsne_map
from covidcxr.audit.findings import derive_findings, verdict
from covidcxr.audit.probe import source_probe
from covidcxr.audit.saliency import gradcam, lung_focus_fraction, plot_gallery, saliency_layer, select_gallery, summarize_lung_focus
from covidcxr.errors import CovidCXRError
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


def audit_run(
    run_dir: str | Path,
    n_boot: int = 1000,
    seed: int = 0,
    gallery_per_group: int = 2,
    max_images: int | None = 2000,
    write: bool = True,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
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

    Returns:
        The ``audit.json`` content: ``run``, ``findings``, ``verdict``, ``evaluation``
        (the cross-source report), ``ablation``, ``source_probe``, ``saliency``,
        ``embedding``, counts and settings.

    Raises:
        CovidCXRError: not a run directory, a multi-class run, no val/test images.
    """
    started = time.perf_counter()
    run = load_run(run_dir)
    if not run.binary:
        raise CovidCXRError(f"{run.run_dir}: the audit scores a binary run (AUC of the positive class); this run has classes {run.classes}")
    rd = RunDir(run.run_dir)
    manifest_file = rd.manifest
    manifest = rd.read_manifest()
    rows = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    if rows.empty or not (rows["split"] == "test").any():
        raise CovidCXRError(f"{manifest_file}: no test images to audit")
    rows = _subsample_by_patient(rows, max_images, seed).reset_index(drop=True)
    lungs_mode = str(run.recipe.preprocess.lungs)

    say(f"audit {run.name}: {len(rows)} val + test images through the run's preprocessing")
    kept, images, lung_masks, excluded = cached_inputs(rows, run.recipe, progress=progress)
    if kept.empty:
        raise CovidCXRError(f"{run.run_dir}: every val/test image was rejected by the preprocessing")
    kept["probability"] = run.predict(images)
    is_test = (kept["split"] == "test").to_numpy()

    say("cross-source evaluation (per source, seen/unseen, within-source AUC, source-only baseline)")
    evaluation = evaluate_run(run.run_dir, threshold=run.threshold, n_boot=n_boot, seed=seed, write=write)

    say("lung ablation: lungs blanked / lungs only")
    test_rows = kept[is_test].reset_index(drop=True)
    ablation = lung_ablation(run, images[is_test], lung_masks[is_test], test_rows, n_boot=n_boot, seed=seed)

    say("source probe on the embeddings (original, lungs blanked, lungs only)")
    embeddings = run.embed(images)
    probe: dict[str, Any] = {"full": source_probe(embeddings, kept["source"].to_numpy(), kept["patient_id"].to_numpy(), n_boot=n_boot, seed=seed)}
    if lungs_mode == "mask":
        probe["lungs_blanked"] = {"skipped": "the run's preprocessing masks the lungs: outside-lung pixels never reach the model"}
    else:
        blanked = run.embed(blank_lungs(images, lung_masks, float(run.recipe.preprocess.pad_value)))
        probe["lungs_blanked"] = source_probe(blanked, kept["source"].to_numpy(), kept["patient_id"].to_numpy(), n_boot=n_boot, seed=seed)
    lungs_only = run.embed(keep_lungs_only(images, lung_masks, float(run.recipe.preprocess.pad_value)))
    probe["lungs_only"] = source_probe(lungs_only, kept["source"].to_numpy(), kept["patient_id"].to_numpy(), n_boot=n_boot, seed=seed)

    layer = saliency_layer(run)
    say(f"Grad-CAM ({layer}) and lung focus on {int(is_test.sum())} test images")
    maps = gradcam(run, images[is_test], layer=layer)
    focus = test_rows[["image", "source", "patient_id", "label", "target", "probability"]].copy()
    focus["lung_focus"] = lung_focus_fraction(maps, lung_masks[is_test])
    focus["lung_area"] = lung_masks[is_test].reshape(int(is_test.sum()), -1).mean(axis=1)
    per_group = summarize_lung_focus(focus)
    valid = focus["lung_focus"].dropna()
    saliency = {
        "method": "Grad-CAM (MONAI), positive logit",
        "layer": layer,
        "per_group": per_group.to_dict(orient="records"),
        "overall": {
            "lung_focus_median": float(valid.median()) if len(valid) else None,
            "lung_area_median": float(focus["lung_area"].median()),
            "n": int(len(focus)),
            "n_empty": int(focus["lung_focus"].isna().sum()),
        },
    }

    say("t-SNE of the embeddings")
    coordinates = tsne_map(embeddings, seed=seed) if len(embeddings) >= 5 else None

    findings = derive_findings(evaluation, ablation, probe, saliency, lungs_mode)
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
        "training_sources": training_sources(run.run_dir),
        "preprocess_lungs": lungs_mode,
        "verdict": verdict(findings),
        "findings": findings,
        "evaluation": evaluation,
        "ablation": ablation,
        "source_probe": probe,
        "saliency": saliency,
        "embedding": {"method": "tsne", "figure": "embedding.png", "table": "embedding.parquet"} if coordinates is not None else {"skipped": "fewer than 5 images"},
        "n_boot": int(n_boot),
        "seed": int(seed),
        "seconds": None,
    }
    if write:
        out = rd.audit_dir
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "lung_focus.parquet") as tmp:
            focus.to_parquet(tmp, index=False)
        gallery = select_gallery(focus.reset_index(drop=True), gallery_per_group)
        if gallery:
            captions = [f"{focus['source'][i]} · {focus['label'][i]} · p={focus['probability'][i]:.2f}" for i in gallery]
            plot_gallery(images[is_test][gallery], maps[gallery], lung_masks[is_test][gallery], captions, out / "gallery.png")
            saliency["gallery"] = "gallery.png"
        if coordinates is not None:
            table = kept[["source", "label", "target", "split"]].copy()
            table["x"], table["y"] = coordinates[:, 0], coordinates[:, 1]
            with atomic_path(out / "embedding.parquet") as tmp:
                table.to_parquet(tmp, index=False)
            plot_embedding(table, out / "embedding.png", title=f"{run.name}: val + test embeddings")
    report["seconds"] = round(time.perf_counter() - started, 2)
    report = json_ready(report)
    if write:
        atomic_write_text(rd.audit_file, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def read_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/audit/audit.json`` if the run was audited, else None."""
    return RunDir(run_dir).read_audit()
