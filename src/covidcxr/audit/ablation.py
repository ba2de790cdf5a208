"""Lung ablation: the model's AUC when the lungs are blanked, and when only the lungs are shown.

A classifier that reads the lungs must lose its discrimination when the lungs are
removed; one that keeps an AUC well above 0.5 without them is using something else
(text markers, borders, devices, patient size — DeGrave et al. 2021 §"Saliency maps";
Tartaglione et al. 2020 §3.2 masks the lungs for exactly this reason). Conversely, a
model whose AUC collapses when it sees the lungs alone (the rest of the image replaced
by the preprocessing's padding value) was not deciding from the lungs.

Blanking sets the pixels under a slightly dilated lung mask to the padding value (0,
black — what lung masking does to the outside): the model sees the same image with the
lung fields removed. Both manipulations produce images the model never saw in training,
so the absolute numbers carry some distribution shift; the *contrast* between them is
what the audit reads (see `covidcxr.audit.findings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import ndimage

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.cross_source import metrics_for_rows, within_source_auc

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["ablate", "blank_lungs", "keep_lungs_only", "lung_ablation"]

#: pixels the lung mask is grown by before blanking, so the soft edge left by the
#: segmentation's post-processing does not outline the lungs
BLANK_DILATION_PIXELS = 2


def _check(images: np.ndarray, lung_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(lung_masks, dtype=bool)
    if images.shape != masks.shape or images.ndim != 3:
        raise CovidCXRError(f"lung ablation: images {images.shape} and lung masks {masks.shape} must both be (N, H, W)")
    return images, masks


def blank_lungs(images: np.ndarray, lung_masks: np.ndarray, fill: float = 0.0, dilation: int = BLANK_DILATION_PIXELS) -> np.ndarray:
    """``(N, H, W)`` images with the (dilated) lung fields set to ``fill``."""
    images, masks = _check(images, lung_masks)
    if dilation > 0:
        structure = np.zeros((1, 3, 3), dtype=bool)
        structure[0] = True
        masks = ndimage.binary_dilation(masks, structure=structure, iterations=dilation)
    out = images.copy()
    out[masks] = fill
    return out


def keep_lungs_only(images: np.ndarray, lung_masks: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """``(N, H, W)`` images with everything outside the lungs set to ``fill``."""
    images, masks = _check(images, lung_masks)
    return np.where(masks, images, np.float32(fill)).astype(np.float32)


def _auc_part(rows: pd.DataFrame, probabilities: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    scored = rows.assign(probability=probabilities)
    metrics = metrics_for_rows(scored, threshold=threshold, n_boot=n_boot, seed=seed) or {}
    per_source = {}
    if "source" in scored.columns:
        for source, part in scored.groupby("source", sort=True):
            if part["target"].nunique() == 2:
                per_source[str(source)] = (metrics_for_rows(part, threshold=threshold, n_boot=n_boot, seed=seed) or {}).get("auc")
    return {
        "per_source_auc": per_source,
        "auc": metrics.get("auc"),
        "within_source_auc": within_source_auc(scored, n_boot=n_boot, seed=seed) if "source" in scored.columns else None,
        "balanced_accuracy": metrics.get("balanced_accuracy"),
        "mean_probability": float(np.mean(probabilities)) if len(probabilities) else None,
        "n_images": metrics.get("n_images", 0),
        "n_patients": metrics.get("n_patients", 0),
        "note": metrics.get("note"),
    }


def lung_ablation(
    run: LoadedRun,
    images: np.ndarray,
    lung_masks: np.ndarray,
    rows: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC (patient-bootstrap CI) of a binary run on original, lungs-blanked and lungs-only inputs.

    Args:
        run: the loaded run (binary task).
        images: ``(N, H, W)`` model inputs (the run's preprocessing output) in [0, 1].
        lung_masks: ``(N, H, W)`` lung masks in the inputs' geometry.
        rows: row-aligned table with ``target``, ``patient_id`` and ``source``.

    Returns:
        ``{"original": part, "lungs_blanked": part, "lungs_only": part}``, each part with
        ``auc``/``balanced_accuracy``/``within_source_auc`` ({estimate, low, high, ...};
        `covidcxr.evaluate.cross_source.within_source_auc`), ``per_source_auc`` (sources
        holding both classes), ``mean_probability``,
        ``n_images``, ``n_patients``. When the run's preprocessing already masks the lungs
        (``preprocess.lungs: mask``) the model never sees outside-lung pixels: blanking
        leaves nothing and ``lungs_blanked`` is ``{"skipped": reason}``.
    """
    if not run.binary:
        raise CovidCXRError(f"lung ablation needs a binary run; {run.name} has classes {run.classes}")
    return ablate(run.predict, images, lung_masks, rows, threshold=run.threshold, fill=float(run.recipe.preprocess.pad_value),
                  masked=run.recipe.preprocess.lungs == "mask", n_boot=n_boot, seed=seed)


def ablate(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    lung_masks: np.ndarray,
    rows: pd.DataFrame,
    threshold: float,
    fill: float = 0.0,
    masked: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """`lung_ablation` for any model: ``predict`` maps ``(N, H, W)`` inputs to ``(N,)`` positive probabilities.

    A foreign model (`covidcxr.evaluate.foreign_model.ForeignModel.predict`) is ablated the same way as a
    run: re-predicted with the lungs blanked and with only the lungs. ``masked``: the model's
    preprocessing already masks the lungs (``lungs_blanked`` is then skipped with the reason).
    """
    images, masks = _check(images, lung_masks)
    if len(rows) != len(images):
        raise CovidCXRError(f"lung ablation: {len(rows)} rows for {len(images)} images")
    out: dict[str, Any] = {"original": _auc_part(rows, predict(images), threshold, n_boot, seed)}
    if masked:
        out["lungs_blanked"] = {"skipped": "the model's preprocessing masks the lungs (preprocess.lungs: mask): the model never sees outside-lung pixels, so blanking the lungs leaves a blank image"}
    else:
        out["lungs_blanked"] = _auc_part(rows, predict(blank_lungs(images, masks, fill)), threshold, n_boot, seed)
    out["lungs_only"] = _auc_part(rows, predict(keep_lungs_only(images, masks, fill)), threshold, n_boot, seed)
    return out
