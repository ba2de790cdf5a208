"""Does the lung mask keep the disease? Recall of the annotated lung per label, and area ratios.

Why: masking the lungs only protects the classifier if the mask keeps what the classifier
must read. A consolidated lower zone is as white as the diaphragm, so a U-Net trained on
"lung = dark air" may cut it away — and then the masked COVID image has lost exactly its
evidence, while a normal image keeps all of its lungs (Selvan et al. 2020 report U-Nets
failing on high-opacity COVID films; Teixeira et al. 2021, Sensors 21:7116, measure how
segmentation changes what classifiers see).

Two measurements, each with a patient-bootstrap 95 % interval and its n images / n patients
(`covidcxr.evaluate.metrics.bootstrap_ci`):

* `recall_by_label` — on images with a reference mask: the share of the annotated lung the
  predicted mask covers (``|pred ∩ ref| / |ref|``), per label, and the difference between
  each disease label and the rest. Dice hides this: a mask that cuts away 15 % of one
  lung still scores Dice ≈ 0.92.
* `area_ratio_by_source` — on images *without* a reference mask: the mean predicted lung
  area (fraction of the image) of the COVID/pneumonia images over that of the normal
  images *of the same source* (same scanner, same population). A ratio well below 1 says
  the mask shrinks on diseased lungs. Sources differ in framing, so only within-source
  ratios are comparable.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((10, 10), bool); ref[2:8, 2:8] = True
    >>> pred = ref.copy(); pred[6:8] = False
    >>> round(lung_recall(pred, ref), 3)
    0.667
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError

#: Labels whose lungs carry opacities (the disease labels of the collection).
DISEASE_LABELS: tuple[str, ...] = ("covid", "pneumonia")
#: An image "lost lung" when the predicted mask covers less than this share of the annotated lung.
LOW_RECALL: float = 0.9


def lung_recall(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of the reference lung inside the predicted mask, ``|P ∩ T| / |T|`` (1.0 for an empty reference).

    Args:
        predicted: ``(H, W)`` bool predicted mask.
        truth: ``(H, W)`` bool reference mask.
    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise CovidCXRError(f"lung_recall: predicted mask {predicted.shape} and reference {truth.shape} differ in shape")
    total = int(truth.sum())
    return 1.0 if total == 0 else int((predicted & truth).sum()) / total


def lung_height_ratio(mask: np.ndarray) -> float:
    """Vertical extent of the shorter lung over the taller one (NaN unless the mask has two pieces).

    The lungs are the mask's two largest 8-connected components (ties: the first in raster
    order, as `lung_shape`). No convex hull: the cheap half of `lung_shape`, run on every
    prediction by `covidcxr.preprocess.screening.opacity_cut_warnings`.

    Example:
        >>> m = np.zeros((100, 100), bool); m[10:90, 10:40] = True; m[10:60, 60:90] = True
        >>> lung_height_ratio(m)
        0.625
    """
    from scipy import ndimage

    labels, found = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    if found < 2:
        return float("nan")
    sizes = np.bincount(labels.ravel())[1:]
    largest = np.argsort(-sizes, kind="stable")[:2]  # stable: equal areas keep label order
    boxes = ndimage.find_objects(labels)
    heights = [boxes[i][0].stop - boxes[i][0].start for i in largest]
    return round(min(heights) / max(heights), 4)


def lung_shape(mask: np.ndarray) -> dict[str, float]:
    """Shape cues of a cut-away lung, from the mask alone (any resolution).

    * ``height_ratio``: vertical extent of the shorter lung over the taller one
      (`lung_height_ratio`). The two lung fields of a frontal film reach within ~10-15 % of
      each other's height (the right hemidiaphragm sits 1.5-2 cm higher); a basal
      consolidation the mask left out shortens one lung.
    * ``solidity``: the lower of the two lungs' area over its convex hull's area
      (scikit-image ``regionprops``). A peripheral opacity the mask wraps around bites
      into the outline.

    The lungs are the mask's two largest 8-connected components; a mask in one piece gives
    NaN for both (the balance check of `covidcxr.preprocess.screening` covers it).

    Example:
        >>> m = np.zeros((100, 100), bool); m[10:90, 10:40] = True; m[10:60, 60:90] = True
        >>> lung_shape(m)
        {'height_ratio': 0.625, 'solidity': 1.0}
    """
    from skimage.measure import label, regionprops

    regions = sorted(regionprops(label(np.asarray(mask, bool), connectivity=2)), key=lambda r: r.area, reverse=True)[:2]
    if len(regions) < 2:
        return {"height_ratio": float("nan"), "solidity": float("nan")}
    return {"height_ratio": lung_height_ratio(mask), "solidity": round(min(float(r.solidity) for r in regions), 4)}


def _mean_ci(values: np.ndarray, patients: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    from covidcxr.evaluate.metrics import bootstrap_ci

    result = bootstrap_ci(np.zeros(len(values)), values, patients, lambda _t, s: float(np.mean(s)), n_boot=n_boot, seed=seed)
    return {
        "mean": round(float(result["estimate"]), 4),
        "ci": [round(float(result["low"]), 4), round(float(result["high"]), 4)],
        "n_images": int(result["n_images"]),
        "n_patients": int(result["n_patients"]),
    }


def _difference_ci(values: np.ndarray, in_group: np.ndarray, patients: np.ndarray, ratio: bool = False, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Patient-bootstrap CI of mean(group) − mean(rest), or mean(group) / mean(rest) with ``ratio``."""
    from covidcxr.evaluate.metrics import bootstrap_ci

    def statistic(flag: np.ndarray, score: np.ndarray) -> float:
        a, b = score[flag == 1], score[flag == 0]
        if len(a) == 0 or len(b) == 0:
            return float("nan")  # skipped by bootstrap_ci
        return float(a.mean() / b.mean()) if ratio else float(a.mean() - b.mean())

    result = bootstrap_ci(in_group.astype(int), values, patients, statistic, n_boot=n_boot, seed=seed)
    return {
        "estimate": round(float(result["estimate"]), 4),
        "ci": [round(float(result["low"]), 4), round(float(result["high"]), 4)],
        "n_images": int(result["n_images"]),
        "n_patients": int(result["n_patients"]),
    }


def _patients(frame: pd.DataFrame) -> np.ndarray:
    # an image without a patient id is its own patient (the manifest's rule)
    ids = frame["patient_id"] if "patient_id" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    return np.array([str(p) if isinstance(p, str) and p else f"image:{i}" for i, p in zip(frame["image"], ids)], dtype=object)


def recall_by_label(per_image: pd.DataFrame, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Mean lung recall per label and per source × label, with patient-bootstrap CIs.

    Args:
        per_image: one row per image with ``recall``, ``label``, ``source``, ``image`` and
            optionally ``patient_id`` (`covidcxr.preprocess.lungs.evaluate_segmenter` output).

    Returns:
        ``per_label`` {label: {mean, ci, n_images, n_patients, low_recall_share}},
        ``per_source_label`` {"source/label": ...}, ``disease_minus_rest`` (the difference
        of mean recall between the disease labels and every other label, with its CI) and
        ``low_recall`` (the threshold behind ``low_recall_share``).
    """
    missing = {"recall", "label", "source", "image"} - set(per_image.columns)
    if missing:
        raise CovidCXRError(f"recall_by_label needs columns {sorted(missing)} in the per-image table")
    frame = per_image.dropna(subset=["recall"]).reset_index(drop=True)
    if frame.empty:
        return {"per_label": {}, "per_source_label": {}, "disease_minus_rest": None, "low_recall": LOW_RECALL}
    patients = _patients(frame)

    def block(mask: np.ndarray) -> dict[str, Any]:
        values = frame.loc[mask, "recall"].to_numpy(float)
        out = _mean_ci(values, patients[mask], seed, n_boot)
        out["low_recall_share"] = round(float((values < LOW_RECALL).mean()), 4)
        return out

    labels = frame["label"].astype(str)
    per_label = {label: block((labels == label).to_numpy()) for label in sorted(labels.unique())}
    keys = frame["source"].astype(str) + "/" + labels
    per_source_label = {key: block((keys == key).to_numpy()) for key in sorted(keys.unique())}
    disease = labels.isin(DISEASE_LABELS).to_numpy()
    contrast = None
    if disease.any() and (~disease).any():
        contrast = _difference_ci(frame["recall"].to_numpy(float), disease, patients, seed=seed, n_boot=n_boot)
        contrast["groups"] = f"{'+'.join(DISEASE_LABELS)} minus every other label"
    return {"per_label": per_label, "per_source_label": per_source_label, "disease_minus_rest": contrast, "low_recall": LOW_RECALL}


def area_ratio_by_source(per_image: pd.DataFrame, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Mean predicted lung area of each disease label over that of the normals, within each source.

    Args:
        per_image: one row per image with ``area`` (predicted lung pixels / image pixels),
            ``label``, ``source``, ``image`` and optionally ``patient_id``.

    Returns:
        {source: {"normal": {mean, ci, n_images, n_patients}, "<label>": {...},
        "<label>_over_normal": {estimate, ci, n_images, n_patients}}} for each source that has
        normal images and at least one disease label.
    """
    missing = {"area", "label", "source", "image"} - set(per_image.columns)
    if missing:
        raise CovidCXRError(f"area_ratio_by_source needs columns {sorted(missing)} in the per-image table")
    out: dict[str, Any] = {}
    for source, group in per_image.groupby(per_image["source"].astype(str), sort=True):
        group = group.reset_index(drop=True)
        labels = group["label"].astype(str)
        if not (labels == "normal").any():
            continue
        patients, area = _patients(group), group["area"].to_numpy(float)
        entry: dict[str, Any] = {"normal": _mean_ci(area[(labels == "normal").to_numpy()], patients[(labels == "normal").to_numpy()], seed, n_boot)}
        for label in DISEASE_LABELS:
            chosen = (labels == label).to_numpy()
            if not chosen.any():
                continue
            both = chosen | (labels == "normal").to_numpy()
            entry[label] = _mean_ci(area[chosen], patients[chosen], seed, n_boot)
            entry[f"{label}_over_normal"] = _difference_ci(area[both], chosen[both], patients[both], ratio=True, seed=seed, n_boot=n_boot)
        if len(entry) > 1:
            out[source] = entry
    return out


def mask_areas(segmenter: Any, rows: pd.DataFrame, show_progress: bool = True) -> pd.DataFrame:
    """Predicted lung area per image (post-processed mask, default convention): the input of `area_ratio_by_source`.

    Args:
        segmenter: a `covidcxr.preprocess.lungs.LungSegmenter`.
        rows: manifest rows (``image``, ``source``, ``label``, optionally ``patient_id``).

    Returns:
        ``rows`` columns ``image, source, label, patient_id`` plus ``area``.
    """
    from covidcxr.io import read_image
    from covidcxr.parallel import make_progress

    records: list[dict[str, Any]] = []
    rows = rows.reset_index(drop=True)
    with make_progress(transient=True) as progress:
        task = progress.add_task("segmenting", total=len(rows), visible=show_progress)
        for start in range(0, len(rows), segmenter.batch_size):
            chunk = rows.iloc[start : start + segmenter.batch_size]
            masks = segmenter.segment_batch([read_image(path).pixels for path in chunk["image"]])
            for row, mask in zip(chunk.to_dict("records"), masks):
                records.append({"image": row["image"], "source": row["source"], "label": row["label"], "patient_id": row.get("patient_id"), "area": float(mask.mean())})
            progress.advance(task, len(chunk))
    return pd.DataFrame.from_records(records)


def sample_per_group(rows: pd.DataFrame, per_group: int | None, seed: int = 0, by: Sequence[str] = ("source", "label")) -> pd.DataFrame:
    """At most ``per_group`` rows of each source × label (all when None), drawn reproducibly."""
    if not per_group:
        return rows.reset_index(drop=True)
    parts = [g.sample(n=min(per_group, len(g)), random_state=seed) for _, g in rows.groupby(list(by), sort=True)]
    return pd.concat(parts).reset_index(drop=True) if parts else rows.iloc[:0]


__all__ = ["DISEASE_LABELS", "LOW_RECALL", "area_ratio_by_source", "lung_height_ratio", "lung_recall", "lung_shape", "mask_areas", "recall_by_label", "sample_per_group"]
