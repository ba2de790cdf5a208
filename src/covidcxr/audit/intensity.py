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

__all__ = ["WINDOWS", "apply_window", "intensity_perturbation", "label_from_intensity", "label_from_intensity_of_run", "outside_lung_features"]

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


#: percentiles of the outside-lung pixels that summarise an image's acquisition look (window/level, background, soft tissue)
INTENSITY_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: lung masks are grown by this share of the image side before "outside the lungs" is taken: the acquisition's
#: blur spreads a lung opacity a few pixels past the mask, and the disease must not leak into the features
LUNG_MARGIN = 0.05
#: the names of `outside_lung_features`' columns
FEATURES = (*(f"p{p}" for p in INTENSITY_PERCENTILES), "mean", "sd", "share_black", "share_white", "noise")


def outside_lung_features(images: np.ndarray, lung_masks: np.ndarray, margin: float = LUNG_MARGIN) -> np.ndarray:
    """``(N, H, W)`` images -> ``(N, 12)``: the intensity statistics of the pixels outside the grown lung mask.

    Percentiles (`INTENSITY_PERCENTILES`), mean and SD; the share of pixels at the black and
    at the white end (a window/level decides what is clipped); and the noise level (median
    absolute difference from a 3 x 3 median filter). A window followed by the run's min-max
    normalisation (``preprocess.equalization: none``) is *not* undone: it changes what was
    clipped and how large the detector noise is against the image's range, and these
    features see that. They summarise the acquisition's intensity mapping (air, soft tissue,
    bone under one window/level) and nothing of the lungs' content: the lung mask is dilated
    by ``margin`` of the image side (scipy) so a blurred lung opacity does not reach them.

    Example:
        >>> features = outside_lung_features(np.zeros((2, 32, 32)), np.zeros((2, 32, 32), bool))
        >>> features.shape
        (2, 12)
    """
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(lung_masks, dtype=bool)
    if images.shape != masks.shape or images.ndim != 3:
        raise ValueError(f"outside-lung features: images {images.shape} and lung masks {masks.shape} must both be (N, H, W)")
    grow = max(1, int(round(margin * images.shape[-1])))
    out = np.zeros((len(images), len(FEATURES)), dtype=np.float64)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        outside = ~ndimage.binary_dilation(mask, iterations=grow) if mask.any() else np.ones_like(mask)
        if not outside.any():
            outside = np.ones_like(mask)
        pixels = image[outside]
        # the 3 x 3 median filter must not reach a lung pixel (it cannot once the mask is grown by 2 or more)
        clear = outside & ~ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool))
        noise = np.abs(image - ndimage.median_filter(image, size=3))[clear if clear.any() else outside]
        out[i] = [*np.percentile(pixels, INTENSITY_PERCENTILES), pixels.mean(), pixels.std(), (pixels <= 1 / 255).mean(), (pixels >= 254 / 255).mean(), np.median(noise)]
    return out


def label_from_intensity(images: np.ndarray, lung_masks: np.ndarray, rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """Is the label predictable from the acquisition's intensities outside the lungs — and is the model better than that?

    The data-level test of an intensity-window shortcut (the counterpart of the
    metadata-only baseline of `covidcxr.evaluate.subgroups` for the projection). A window
    that comes with the label (COVID films from another scanner's look-up table, Tartaglione
    et al. 2020 §3.2) changes the *whole* image, lungs included, so neither blanking the lungs
    nor perturbing the window outside them shows whether a model reads it: a model that reads
    the window inside the lungs, where the disease's opacity also brightens them, cannot be
    told apart from one that reads the disease by moving pixels. What can be measured is the
    evidence the window offers: a logistic regression (scikit-learn, standardised features)
    on `outside_lung_features` (standardised within each source) — the disease lives inside the lungs, so these carry the
    acquisition, not the diagnosis — cross-validated over patient-grouped, label-stratified
    folds (``StratifiedGroupKFold``), scored by the AUC over (positive, negative) pairs of one
    source (the source's own look is the source probe's business, and a label mix that differs
    between sources must not pass for a window). The model's within-source AUC on the same
    images and resamples gives the paired difference (model − intensity baseline) with a
    patient-bootstrap 95% CI: when the intensities predict the label well and the model does
    not clearly beat them, its AUC is no evidence that it reads the lungs.

    Args:
        images: ``(N, H, W)`` model inputs in [0, 1] (what the model sees: after equalisation,
            which can cancel a global window, the baseline then finds nothing, as the model would).
        lung_masks: ``(N, H, W)`` bool lung masks.
        rows: row-aligned ``target``, ``patient_id``, ``source`` and ``probability`` (the model's score).
        folds: cross-validation folds (fewer when there are fewer patients of a class).

    Returns:
        ``{"baseline": {estimate, low, high, n_images, n_patients}, "model": {...},
        "difference": {...}, "features", "folds"}`` (AUCs within source), or ``{"skipped": reason}``.

    Example:
        >>> result = label_from_intensity(images, masks, rows, n_boot=200)   # doctest: +SKIP
        >>> result["baseline"]["estimate"], result["difference"]["low"]       # doctest: +SKIP
        (0.93, -0.06)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(rows) != len(images):
        raise ValueError(f"label from intensity: {len(rows)} rows for {len(images)} images")
    y = rows["target"].to_numpy().astype(np.int64)
    patients = rows["patient_id"].astype(str).to_numpy()
    strata = rows["source"].astype(str).to_numpy()
    per_class = min((len(pd.unique(patients[y == k])) for k in (0, 1)), default=0)
    k = min(folds, per_class)
    if k < 2:
        return {"skipped": "fewer than 2 patients of a class among the audited images"}
    if not any(0 < y[strata == s].sum() < (strata == s).sum() for s in pd.unique(strata)):
        return {"skipped": "no source holds both classes among the audited images (a within-source AUC needs both)"}
    features = outside_lung_features(images, lung_masks)
    # standardised within each source, without the labels: a source's own look (the source
    # probe's business) must not hide, nor pass for, a window that comes with the label there
    features = pd.DataFrame(features).groupby(strata).transform(lambda c: (c - c.mean()) / (c.std(ddof=0) or 1.0)).to_numpy()
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    try:
        baseline = cross_val_predict(classifier, features, y, groups=patients, cv=StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), method="predict_proba")[:, 1]
    except ValueError as exc:  # a training fold left with one class (few patients): say so, do not guess
        return {"skipped": f"the cross-validation could not be fitted ({exc})"}
    model = rows["probability"].to_numpy().astype(np.float64)
    n = len(rows)

    def auc_of(scores: np.ndarray) -> Any:
        def metric(_y: np.ndarray, index: np.ndarray) -> float:
            drawn = index.astype(np.int64)
            return _pair_weighted_auc(y[drawn], scores[drawn], strata[drawn])

        return metric

    def difference(_y: np.ndarray, index: np.ndarray) -> float:
        return auc_of(model)(_y, index) - auc_of(baseline)(_y, index)

    index = np.arange(n, dtype=np.float64)
    keep = ("estimate", "low", "high", "n_images", "n_patients")
    out = {name: {key: ci[key] for key in keep} for name, ci in (
        ("baseline", bootstrap_ci(y, index, patients, auc_of(baseline), n_boot=n_boot, seed=seed)),
        ("model", bootstrap_ci(y, index, patients, auc_of(model), n_boot=n_boot, seed=seed)),
        ("difference", bootstrap_ci(y, index, patients, difference, n_boot=n_boot, seed=seed)),
    )}
    out.update(features=list(FEATURES), folds=k, region=f"outside the lungs (masks grown by {LUNG_MARGIN:.0%} of the side)")
    return json_ready(out)


def label_from_intensity_of_run(run: LoadedRun, images: np.ndarray, lung_masks: np.ndarray, rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`label_from_intensity` on a run's model inputs, skipped when the run masks the lungs (nothing outside them reaches it)."""
    if str(getattr(run.recipe.preprocess, "lungs", "none")) == "mask":
        return {"skipped": "the run masks the lungs (preprocess.lungs: mask): nothing outside them reaches the model"}
    return label_from_intensity(images, lung_masks, rows, n_boot=n_boot, seed=seed)
