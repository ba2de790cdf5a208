"""Lung-focus saliency: Grad-CAM per image and the share of it inside the lung mask.

DeGrave et al. (2021) and Tartaglione et al. (2020, Fig. 5) read saliency maps to see
whether a COVID-19 classifier looks at the lungs or at text markers, borders and
shoulders. Reading maps one by one does not scale and is easy to fool oneself with, so
the audit summarises each map by one number, the **lung-focus fraction**: the share of
the (non-negative, upsampled) Grad-CAM mass that lies inside the lung mask. A map spread
uniformly over the image would score the lung-area fraction (``lung_area``), so the
number to compare against is that, not 1.

Grad-CAM itself is MONAI's (`monai.visualize.GradCAM`) on the model's last stage
(`CXRClassifier.gradcam_layer`).

Example:
    >>> run = load_run("runs/demo")                                      # doctest: +SKIP
    >>> cams = gradcam(run, images)                                      # (N, H, W) in [0, 1]
    >>> lung_focus_fraction(cams, lung_masks)                            # (N,)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from covidcxr.errors import CovidCXRError

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["gradcam", "lung_focus_fraction", "summarize_lung_focus"]


def gradcam(run: LoadedRun, images: np.ndarray, class_index: int | None = None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps for model inputs.

    Args:
        run: a loaded run (`covidcxr.train.inference.load_run`).
        images: ``(N, H, W)`` model inputs in [0, 1] (the preprocessing's output).
        class_index: the output to explain; default: the positive logit of a binary run,
            the predicted class of a multi-class run.
        batch_size: images per backward pass.

    Returns:
        ``(N, H, W)`` float32 maps in [0, 1] (each min-max normalised by MONAI), upsampled
        to the input size. A map with no positive evidence is all zeros.
    """
    from monai.visualize import GradCAM

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise CovidCXRError(f"gradcam: images must be (N, H, W); got shape {images.shape}")
    model = run.model
    cam = GradCAM(nn_module=model, target_layers=model.gradcam_layer)
    maps = []
    for start in range(0, len(images), batch_size):
        x = run.normalize(images[start : start + batch_size])
        with torch.enable_grad():
            # MONAI explains the argmax class per image when class_idx is None
            out = cam(x, class_idx=class_index if class_index is not None else (0 if run.binary else None))
        maps.append(np.nan_to_num(out.detach().float().numpy()[:, 0], nan=0.0))
    model.zero_grad(set_to_none=True)
    if not maps:
        return np.zeros((0, *images.shape[1:]), dtype=np.float32)
    return np.clip(np.concatenate(maps), 0.0, 1.0).astype(np.float32)


def lung_focus_fraction(maps: np.ndarray, lung_masks: np.ndarray) -> np.ndarray:
    """Share of each saliency map's mass inside its lung mask.

    Args:
        maps: ``(N, H, W)`` non-negative saliency.
        lung_masks: ``(N, H, W)`` bool lung masks in the same geometry.

    Returns:
        ``(N,)`` fractions in [0, 1]; NaN where a map is empty (nothing to attribute).
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(lung_masks, dtype=bool)
    if maps.shape != masks.shape:
        raise CovidCXRError(f"lung_focus_fraction: maps {maps.shape} and lung masks {masks.shape} differ in shape")
    if (maps < 0).any():
        raise CovidCXRError("lung_focus_fraction: saliency maps must be non-negative (Grad-CAM after its ReLU)")
    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * masks).reshape(len(maps), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def summarize_lung_focus(table: pd.DataFrame, by: tuple[str, ...] = ("source", "label")) -> pd.DataFrame:
    """Median lung-focus fraction (and lung area, the uniform-map baseline) per group.

    Args:
        table: one row per image with ``lung_focus``, ``lung_area`` and the ``by`` columns.

    Returns:
        One row per group: ``n``, ``lung_focus_median``, ``lung_focus_q1``, ``lung_focus_q3``,
        ``lung_area_median`` and ``share_mostly_outside`` (images with under half the map
        inside the lungs).
    """
    missing = [c for c in ("lung_focus", "lung_area", *by) if c not in table.columns]
    if missing:
        raise CovidCXRError(f"summarize_lung_focus: the table lacks columns {missing}")
    rows = []
    for key, part in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        focus = part["lung_focus"].dropna()
        rows.append(
            {
                **dict(zip(by, key)),
                "n": int(len(part)),
                "lung_focus_median": float(focus.median()) if len(focus) else float("nan"),
                "lung_focus_q1": float(focus.quantile(0.25)) if len(focus) else float("nan"),
                "lung_focus_q3": float(focus.quantile(0.75)) if len(focus) else float("nan"),
                "lung_area_median": float(part["lung_area"].median()),
                "share_mostly_outside": float((focus < 0.5).mean()) if len(focus) else float("nan"),
            }
        )
    return pd.DataFrame(rows)
