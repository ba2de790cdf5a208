"""Occlusion saliency: where covering the image lowers the positive score — for any model, no gradients needed.

Grad-CAM (`covidcxr.audit.saliency.gradcam`) needs the network's gradients and a named
layer; a foreign ONNX or TorchScript model (`covidcxr.evaluate.foreign_model`) offers neither. The
model-agnostic alternative is **occlusion** (Zeiler & Fergus 2014, "Visualizing and
understanding convolutional networks", ECCV, §4.2): slide a square patch over the input,
set it to a fill value, re-predict, and credit each pixel with the drop of the positive
probability caused by the patches that cover it (averaged over them, as Captum's
``Occlusion`` does). Only drops count (a patch whose removal *raises* the score is not
evidence for the positive class), so the map is non-negative like Grad-CAM after its ReLU
and feeds the same lung-focus fraction (`covidcxr.audit.saliency.lung_focus_fraction`).
RISE (Petsiuk et al. 2018, BMVC) is the randomised cousin — random masks instead of a
sliding patch; the sliding patch is deterministic and its cost is known in advance:
``(1 + ceil((H - patch) / stride)) * (1 + ceil((W - patch) / stride))`` predictions per image.

Hand-written here (a few lines of NumPy) because the model is only a ``predict`` function:
Captum's ``Occlusion`` wants a differentiable PyTorch module, which an onnxruntime session
is not.

Example:
    >>> maps = occlusion_saliency(model.predict, images)                 # doctest: +SKIP
    >>> lung_focus_fraction(maps, lung_masks)                            # (N,)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from covidcxr.errors import CovidCXRError

__all__ = ["occlusion_positions", "occlusion_saliency"]


def occlusion_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) offsets of the patches along one side, the last one flush with the edge."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_saliency(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    patch: int | None = None,
    stride: int | None = None,
    fill: float = 0.0,
    batch_size: int = 256,
) -> np.ndarray:
    """Occlusion maps of the positive probability (Zeiler & Fergus 2014).

    Args:
        predict: ``(B, H, W)`` model inputs in [0, 1] -> ``(B,)`` positive probabilities.
        images: ``(N, H, W)`` model inputs in [0, 1].
        patch: the occluding square's side in pixels (default: an eighth of the shorter side, at least 4).
        stride: the step between patches (default: ``patch``, a non-overlapping grid).
        fill: the occluder's value (default 0: the preprocessing's padding, what lung
            blanking uses too).
        batch_size: occluded copies per ``predict`` call.

    Returns:
        ``(N, H, W)`` float32 maps in [0, 1], each divided by its maximum; all zeros where no
        patch lowers the score (nothing to attribute — `lung_focus_fraction` gives NaN).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise CovidCXRError(f"occlusion_saliency: images must be (N, H, W); got shape {images.shape}")
    n, height, width = images.shape
    patch = int(patch or max(4, min(height, width) // 8))
    stride = int(stride or patch)
    if patch < 1 or stride < 1:
        raise CovidCXRError(f"occlusion_saliency: patch and stride must be positive; got {patch}, {stride}")
    boxes = [(r, c) for r in occlusion_positions(height, patch, stride) for c in occlusion_positions(width, patch, stride)]
    coverage = np.zeros((height, width), dtype=np.float32)
    for r, c in boxes:
        coverage[r : r + patch, c : c + patch] += 1.0
    maps = np.zeros_like(images)
    if n == 0:
        return maps
    original = np.asarray(predict(images), dtype=np.float64).reshape(-1)
    jobs = [(i, r, c) for i in range(n) for r, c in boxes]
    for start in range(0, len(jobs), batch_size):
        part = jobs[start : start + batch_size]
        batch = images[[i for i, _, _ in part]].copy()
        for k, (_, r, c) in enumerate(part):
            batch[k, r : r + patch, c : c + patch] = fill
        drops = original[[i for i, _, _ in part]] - np.asarray(predict(batch), dtype=np.float64).reshape(-1)
        for (i, r, c), drop in zip(part, drops):
            if drop > 0:
                maps[i, r : r + patch, c : c + patch] += np.float32(drop)
    maps /= coverage[None]
    peak = maps.reshape(n, -1).max(axis=1)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return np.clip(maps / scale[:, None, None], 0.0, 1.0).astype(np.float32)
