"""Source probe: can the image's source (hospital, scanner, collection) be read off the model's embedding?

Tartaglione et al. (2020, §4.3 and Fig. 4) show the embeddings of a COVID-19 classifier
cluster by *source* rather than by diagnosis; DeGrave et al. (2021) show the shortcut
features live largely outside the lungs. The probe makes that a number: a linear
classifier (logistic regression on standardised, PCA-reduced embeddings — scikit-learn)
is trained to predict the source, with patient-grouped cross-validation so no patient is
in both the probe's training and test folds, and scored by balanced accuracy against
chance (1 / number of sources). The same probe on images with the lungs blanked tells
whether the source is recognisable from outside-lung pixels alone.

Example:
    >>> result = source_probe(embeddings, sources, patient_ids)          # doctest: +SKIP
    >>> result["balanced_accuracy"]["estimate"], result["chance"]        # doctest: +SKIP
    (0.97, 0.333)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.metrics import bootstrap_ci

__all__ = ["MIN_IMAGES_PER_SOURCE", "source_probe"]

#: a source needs this many images (and as many patients as folds) to be probed
MIN_IMAGES_PER_SOURCE = 5


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"skipped": reason, **extra}


def source_probe(
    embeddings: np.ndarray,
    sources: np.ndarray,
    patient_ids: np.ndarray,
    folds: int = 5,
    max_components: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated linear probe of the source from embeddings.

    Args:
        embeddings: ``(N, D)`` image embeddings (`LoadedRun.embed`).
        sources: ``(N,)`` source names.
        patient_ids: ``(N,)`` patient ids; folds are patient-disjoint.
        folds: cross-validation folds (lowered to the smallest source's patient count).
        max_components: PCA dimensions kept before the probe (fewer when there are fewer
            images): with ~100 images and 512 features an unreduced probe would overfit.
        n_boot: patient-bootstrap resamples for the CI of the balanced accuracy.
        seed: seed of the folds and the bootstrap.

    Returns:
        ``balanced_accuracy`` ({estimate, low, high}), ``chance`` (1 / sources),
        ``n_images``, ``n_patients``, ``n_sources``, ``sources``, ``folds``,
        ``confusion`` (rows true source, columns predicted), ``left_out`` (sources with too
        few images); or ``{"skipped": reason}`` when fewer than two sources can be probed.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    src = np.asarray(sources).astype(str)
    patients = np.asarray(patient_ids).astype(str)
    if x.ndim != 2 or len(x) != len(src) or len(src) != len(patients):
        raise CovidCXRError(f"source_probe: embeddings {x.shape}, sources {src.shape} and patient_ids {patients.shape} must be row-aligned (N, D), (N,), (N,)")
    if not np.all(np.isfinite(x)):
        raise CovidCXRError("source_probe: embeddings contain NaN or infinite values")
    names, counts = np.unique(src, return_counts=True)
    patients_per = {n: len(set(patients[src == n])) for n in names}
    usable = [n for n, c in zip(names, counts) if c >= MIN_IMAGES_PER_SOURCE and patients_per[n] >= 2]
    left_out = sorted(set(names) - set(usable))
    if len(usable) < 2:
        return _skipped(f"needs two sources with >= {MIN_IMAGES_PER_SOURCE} images and >= 2 patients each; have {dict(zip(names.tolist(), counts.tolist()))}", left_out=left_out)
    keep = np.isin(src, usable)
    x, src, patients = x[keep], src[keep], patients[keep]
    y = np.searchsorted(np.asarray(usable), src)
    n_folds = int(max(2, min(folds, min(patients_per[n] for n in usable))))
    components = int(max(1, min(max_components, x.shape[1], len(x) - len(x) // n_folds - 1)))
    probe = make_pipeline(
        StandardScaler(),
        PCA(n_components=components, random_state=seed),
        LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced"),
    )
    predicted = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train_index, test_index in splitter.split(x, y, groups=patients):
        if len(np.unique(y[train_index])) < 2:
            continue  # a fold without two sources to learn from cannot predict; left unpredicted
        probe.fit(x[train_index], y[train_index])
        predicted[test_index] = probe.predict(x[test_index])
    done = predicted >= 0
    y, predicted, patients = y[done], predicted[done], patients[done]

    # bootstrap_ci resamples patients and hands metric_fn (labels, scores); the labels it
    # accepts are binary, so the resampled *row indices* travel as the scores and the
    # multi-class balanced accuracy is computed on the rows they select.
    def resampled_balanced_accuracy(_labels: np.ndarray, rows: np.ndarray) -> float:
        index = rows.astype(np.int64)
        if len(np.unique(y[index])) < 2:
            raise ValueError("one source only in this resample")
        return float(balanced_accuracy_score(y[index], predicted[index]))

    ci = bootstrap_ci(np.zeros(len(y), dtype=np.int64), np.arange(len(y), dtype=np.float64), patients, resampled_balanced_accuracy, n_boot=n_boot, seed=seed)
    confusion = np.zeros((len(usable), len(usable)), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    return {
        "balanced_accuracy": {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"]},
        "chance": 1.0 / len(usable),
        "n_images": int(len(y)),
        "n_patients": int(len(set(patients))),
        "n_sources": len(usable),
        "sources": list(usable),
        "folds": n_folds,
        "components": components,
        "confusion": confusion.tolist(),
        "left_out": left_out,
    }
