"""Intensity-window perturbation: does a global window/level change move the model's score?

Blanking the lungs (`covidcxr.audit.ablation`) cannot expose a shortcut that changes the
*whole* image — another scanner's look-up table, a different window/level — because such
a shortcut lives in the lungs too (Tartaglione et al. 2020 §3.2 name windowing differences
between sources among the cues a network picks up). This test changes only the global
intensity mapping of each model input, the lungs' content untouched, and asks how far the
score moves:

- ``flip_rate``: the share of test images whose decision at the run's threshold changes;
- ``shift_auc``: within one label, the AUC with which the model's score separates the
  windowed copy from the original (pairs formed within a label only; 0.5: the window does
  not move the score; 1.0 or 0.0: it moves every image's score past every other's).

Both with a patient-bootstrap 95% CI. The window is applied OUTSIDE the lungs only (the lung
pixels are left as they were) when the lung masks are given — as the audit gives them: a
global window also brightens the lungs, and on a model that reads the lungs a brighter lung
*is* more opacity — the disease's own sign — so a global window moves a clean model's score
too (measured on a clean phantom model: 42–48% of decisions flipped, called a shortcut). With
the lungs held fixed, only the acquisition's look (background, soft tissue, bones) changes: a
model that learned "bright and flat means COVID" follows it, one that reads the lungs does
not. A run that masks the lungs (``preprocess.lungs: mask``) shows the model nothing outside
them, so the test is skipped there. Which
windows: a brighter, flatter one (the planted phantom window of `covidcxr.data.synth`) and
its inverse (darker, steeper, clipped). The windows act on what the model sees — its
preprocessed input — and only for runs without histogram equalisation: equalisation maps a
global monotone window back onto the same histogram (the planted phantom window leaves a mean
|difference| of 0.007 after it), so such a shortcut never reaches an equalising model, while a
window applied *after* equalisation shows the model images it never saw (a clean equalising
model flipped 69% of its decisions: a false alarm, not a finding).

Example:
    >>> result = intensity_perturbation(run, images, rows, n_boot=200)   # doctest: +SKIP
    >>> result["windows"]["brighter_flatter"]["flip_rate"]["estimate"]   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidcxr.evaluate.cross_source import _pair_weighted_auc, json_ready
from covidcxr.evaluate.metrics import bootstrap_ci

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["WINDOWS", "apply_window", "intensity_perturbation"]

#: name -> (low, high, description): input x becomes clip(low + (high - low) * x) or, for
#: the inverse (low > high is not used), clip((x - low) / (high - low))
WINDOWS = {
    "brighter_flatter": (0.17, 0.92, "x -> 0.17 + 0.75 x: brighter, lower contrast"),
    "darker_steeper": (-0.227, 1.107, "x -> (x - 0.17) / 0.75: darker, higher contrast, clipped"),
}


def apply_window(images: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(N, H, W)`` images in [0, 1] mapped by ``low + (high - low) * x``, clipped to [0, 1]."""
    return np.clip(np.float32(low) + np.float32(high - low) * np.asarray(images, dtype=np.float32), 0.0, 1.0)


def _window_effect(original: np.ndarray, windowed: np.ndarray, rows: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    patients = rows["patient_id"].astype(str).to_numpy()
    labels = rows["target"].to_numpy().astype(np.int64)
    flipped = ((original >= threshold) != (windowed >= threshold)).astype(np.float64)

    def mean(_y: np.ndarray, values: np.ndarray) -> float:
        return float(np.mean(values))

    flip = bootstrap_ci(labels, flipped, patients, mean, n_boot=n_boot, seed=seed)
    # stacked: each image twice (original: 0, windowed: 1), stratified by its label
    n = len(rows)
    is_windowed = np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)]
    scores = np.r_[original, windowed].astype(np.float64)
    strata = np.r_[labels, labels]

    def shift(_y: np.ndarray, index: np.ndarray) -> float:
        drawn = index.astype(np.int64)
        both = np.r_[drawn, drawn + n]
        return _pair_weighted_auc(is_windowed[both], scores[both], strata[both])

    effect = bootstrap_ci(labels, np.arange(n, dtype=np.float64), patients, shift, n_boot=n_boot, seed=seed)
    return {
        "flip_rate": {k: flip[k] for k in ("estimate", "low", "high")},
        "shift_auc": {k: effect[k] for k in ("estimate", "low", "high")},
        "mean_probability_change": float(np.mean(windowed - original)),
        "n_images": int(n),
        "n_patients": int(pd.unique(patients).size),
    }


def intensity_perturbation(run: LoadedRun, images: np.ndarray, rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, lung_masks: np.ndarray | None = None) -> dict[str, Any]:
    """The score's dependence on a global intensity window, per window of `WINDOWS`.

    Args:
        run: a loaded binary run (its ``predict`` and ``threshold``).
        images: ``(N, H, W)`` model inputs in [0, 1] (the run's preprocessing output).
        rows: row-aligned table with ``target`` and ``patient_id``.
        lung_masks: ``(N, H, W)`` bool lung masks: the window then changes only the pixels
            outside the lungs (see the module docstring); None windows the whole image.

    Returns:
        ``{"threshold", "region", "windows": {name: {description, flip_rate, shift_auc,
        mean_probability_change, n_images, n_patients}}}`` (``flip_rate``/``shift_auc``:
        ``{estimate, low, high}``), or ``{"skipped": reason}`` with fewer than 2 images.
    """
    if len(rows) != len(images):
        raise ValueError(f"intensity perturbation: {len(rows)} rows for {len(images)} images")
    if len(rows) < 2:
        return {"skipped": "fewer than 2 test images"}
    equalization = str(getattr(run.recipe.preprocess, "equalization", "none"))
    if equalization != "none":
        # the window acts before equalisation in an acquisition: after it, the model's input is
        # (nearly) unchanged, and windowing the equalised input would test images the model never sees
        return {"skipped": f"the run equalises histograms (preprocess.equalization: {equalization}), which cancels a global monotone window before the model sees it"}
    if lung_masks is not None and str(getattr(run.recipe.preprocess, "lungs", "none")) == "mask":
        return {"skipped": "the run masks the lungs (preprocess.lungs: mask): nothing outside them reaches the model, and a window on the lungs alone is confounded with the disease's own opacity"}
    if lung_masks is not None and np.shape(lung_masks) != np.shape(images):
        raise ValueError(f"intensity perturbation: lung masks {np.shape(lung_masks)} for images {np.shape(images)}")
    original = np.asarray(run.predict(images), dtype=np.float64)
    region = "whole image" if lung_masks is None else "outside the lungs (lung pixels unchanged)"
    out: dict[str, Any] = {"threshold": float(run.threshold), "region": region, "windows": {}}
    for name, (low, high, description) in WINDOWS.items():
        perturbed = apply_window(images, low, high)
        if lung_masks is not None:
            perturbed = np.where(np.asarray(lung_masks, dtype=bool), np.asarray(images, dtype=np.float32), perturbed)
        windowed = np.asarray(run.predict(perturbed), dtype=np.float64)
        out["windows"][name] = {"description": description, **_window_effect(original, windowed, rows, run.threshold, n_boot, seed)}
    return json_ready(out)
