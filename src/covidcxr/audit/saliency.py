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
    >>> cams = gradcam(run, images)          # (N, H, W) in [0, 1]         # doctest: +SKIP
    >>> lung_focus_fraction(cams, lung_masks)  # (N,)                       # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from covidcxr.errors import CovidCXRError

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["MIN_SALIENCY_GRID", "gallery_captions", "gradcam", "saliency_layer", "lung_focus_fraction", "lung_focus_report", "plot_gallery", "select_gallery", "summarize_lung_focus"]


#: the audit explains the deepest stage whose feature map is at least this many cells a side
MIN_SALIENCY_GRID = 8


def saliency_layer(run: LoadedRun) -> str:
    """The stage the audit's Grad-CAM explains: the deepest with a >= `MIN_SALIENCY_GRID` map.

    A ResNet's last stage is 1/32 of the input (4 x 4 cells at 128 px): one cell covers a
    whole lung apex and a corner marker at once, so the lung-focus fraction could not tell
    them apart. The stage before it (8 x 8 at 128 px, 14 x 14 at 224 px) localises a text
    marker while still being semantic (Selvaraju et al. 2017 use the last conv layer; the
    resolution trade-off is theirs too).
    """
    model = run.model
    sizes: dict[str, int] = {}
    hooks = [
        model.get_submodule(f"stages.{k}").register_forward_hook(lambda _m, _i, out, k=k: sizes.__setitem__(f"stages.{k}", int(min(out.shape[-2:]))))
        for k in range(len(model.stages))
    ]
    try:
        with torch.no_grad():
            model(run.normalize(np.zeros((1, *run.input_size), dtype=np.float32)))
    finally:
        for hook in hooks:
            hook.remove()
    deepest = f"stages.{len(model.stages) - 1}"
    for k in reversed(range(len(model.stages))):
        name = f"stages.{k}"
        if sizes.get(name, 0) >= MIN_SALIENCY_GRID:
            return name
    return deepest


def gradcam(run: LoadedRun, images: np.ndarray, class_index: int | None = None, batch_size: int = 32, layer: str | None = None) -> np.ndarray:
    """Grad-CAM maps for model inputs.

    Args:
        run: a loaded run (`covidcxr.train.inference.load_run`).
        images: ``(N, H, W)`` model inputs in [0, 1] (the preprocessing's output).
        class_index: the output to explain; default: the positive logit of a binary run,
            the predicted class of a multi-class run.
        batch_size: images per backward pass.
        layer: the module to explain (default: `CXRClassifier.gradcam_layer`, the last stage).

    Returns:
        ``(N, H, W)`` float32 maps in [0, 1] (each divided by its maximum), upsampled to
        the input size. A map with no positive evidence is all zeros.
    """
    from monai.visualize import GradCAM

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise CovidCXRError(f"gradcam: images must be (N, H, W); got shape {images.shape}")
    model = run.model
    # MONAI's default post-processing maps (min, max) to (1, 0) — it *flips* magnitudes (its
    # docstring says so) — which would paint the strongest evidence as the weakest. Keep the
    # raw ReLU'd map and scale each by its own maximum instead.
    cam = GradCAM(nn_module=model, target_layers=layer or model.gradcam_layer, postprocessing=lambda x: x)
    maps = []
    for start in range(0, len(images), batch_size):
        x = run.normalize(images[start : start + batch_size])
        with torch.enable_grad():
            # MONAI explains the argmax class per image when class_idx is None
            out = cam(x, class_idx=class_index if class_index is not None else (0 if run.binary else None))
        raw = np.nan_to_num(out.detach().float().numpy()[:, 0], nan=0.0).clip(min=0.0)
        peak = raw.reshape(len(raw), -1).max(axis=1)
        maps.append(np.where(peak[:, None, None] > 0, raw / np.where(peak > 0, peak, 1.0)[:, None, None], 0.0))
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


def lung_focus_report(maps: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, method: str, **extra: Any) -> tuple[dict[str, Any], pd.DataFrame]:
    """The audit's lung-focus evidence for any saliency method: the summary and the per-image table.

    One owner for what the run-based audit (Grad-CAM) and the black-box audit (occlusion)
    report, so both read the same way in ``audit.json`` and the report.

    Args:
        maps: ``(N, H, W)`` non-negative saliency maps.
        masks: ``(N, H, W)`` bool lung masks in the same geometry.
        rows: ``N`` rows with ``image, source, patient_id, label, target, probability``.
        method: the sentence naming the method (stored as ``method``).
        **extra: further summary keys (e.g. ``layer``, ``method_name``).

    Returns:
        ``(summary, table)``: ``summary`` has ``method``, ``per_group`` (`summarize_lung_focus`)
        and ``overall`` (median lung focus, median lung area, share mostly outside, ``n``,
        ``n_empty``); ``table`` adds ``lung_focus`` and ``lung_area`` to ``rows``.

    Example:
        >>> maps = np.ones((1, 4, 4), np.float32); masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
        >>> rows = pd.DataFrame({"image": ["a"], "source": ["s"], "patient_id": ["p"], "label": ["covid"], "target": [1], "probability": [0.9]})
        >>> lung_focus_report(maps, masks, rows, "uniform")[0]["overall"]["lung_focus_median"]
        0.5
    """
    focus = rows[["image", "source", "patient_id", "label", "target", "probability"]].reset_index(drop=True)
    focus["lung_focus"] = lung_focus_fraction(maps, masks)
    focus["lung_area"] = np.asarray(masks).reshape(len(masks), -1).mean(axis=1)
    valid = focus["lung_focus"].dropna()
    summary = {
        "method": method,
        **extra,
        "per_group": summarize_lung_focus(focus).to_dict(orient="records"),
        "overall": {
            "lung_focus_median": float(valid.median()) if len(valid) else None,
            "lung_area_median": float(focus["lung_area"].median()),
            "share_mostly_outside": float((valid < 0.5).mean()) if len(valid) else None,
            "n": int(len(focus)),
            "n_empty": int(focus["lung_focus"].isna().sum()),
        },
    }
    return summary, focus


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


def select_gallery(table: pd.DataFrame, per_group: int = 2, by: tuple[str, ...] = ("source", "label")) -> list[int]:
    """Row positions for the overlay gallery: per group, the most confident positive calls first.

    Args:
        table: per-image rows with ``probability`` and the ``by`` columns (index 0..n-1).
        per_group: images per group.
    """
    chosen: list[int] = []
    for _, part in table.groupby(list(by), sort=True):
        chosen.extend(part.sort_values("probability", ascending=False).index[:per_group].tolist())
    return [int(i) for i in chosen]


def gallery_captions(table: pd.DataFrame, threshold: float, positive: str, negative: str) -> tuple[list[str], list[bool]]:
    """Two-line gallery captions: where the image is from and its truth, then the decision and whether it is right.

    Args:
        table: the gallery's rows (``source``, ``label``, ``target``, ``probability``).
        threshold: the run's decision threshold (``probability >= threshold`` is ``positive``).
        positive, negative: the run's class names.

    Returns:
        ``(captions, correct)``, e.g. ``"site_a · true covid"`` / ``"p=0.93 → covid ✓ right"``.
    """
    captions, correct = [], []
    for row in table.itertuples(index=False):
        decided = float(row.probability) >= float(threshold)
        right = decided == bool(int(row.target))
        captions.append(f"{row.source} · true {row.label}\np={float(row.probability):.2f} → {positive if decided else negative} {'✓ right' if right else '✗ wrong'}")
        correct.append(right)
    return captions, correct


def plot_gallery(
    images: np.ndarray, maps: np.ndarray, lung_masks: np.ndarray, captions: list[str], path: str | Path, columns: int = 6,
    correct: list[bool] | None = None,
) -> Path:
    """Grid of Grad-CAM overlays (jet, 45 % opacity) with the lung mask's contour in white; atomic PNG.

    Args:
        images: ``(N, H, W)`` model inputs in [0, 1].
        maps: ``(N, H, W)`` saliency in [0, 1].
        lung_masks: ``(N, H, W)`` bool.
        captions: one caption per image (:func:`gallery_captions`; two lines fit).
        path: the PNG to write.
        columns: images per row.
        correct: per image, whether the decision was right: the caption is drawn in the
            palette's bluish green (right) or vermillion (wrong); the text says it too, so
            colour is never the only cue.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidcxr.io.atomic import atomic_path
    from covidcxr.report.palette import OKABE_ITO

    n = len(images)
    if n == 0:
        raise CovidCXRError("plot_gallery: no images to draw")
    columns = max(1, min(columns, n))
    rows = int(np.ceil(n / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.5 * columns, 2.95 * rows), squeeze=False, layout="constrained")
    for k, axis in enumerate(axes.ravel()):
        axis.axis("off")
        if k >= n:
            continue
        axis.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        axis.imshow(maps[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if lung_masks[k].any():
            axis.contour(lung_masks[k].astype(float), levels=[0.5], colors="white", linewidths=0.8)
        colour = "black" if correct is None else (OKABE_ITO["bluish_green"] if correct[k] else OKABE_ITO["vermillion"])
        axis.set_title(captions[k], fontsize=9, color=colour, linespacing=1.25)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path
