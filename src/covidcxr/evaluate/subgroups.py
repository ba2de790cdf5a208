"""Confounders beyond the source: subgroup metrics, a metadata-only baseline, view dependence.

DeGrave et al. (2021, *Nat. Mach. Intell.* 3:610) found that COVID-19 radiograph classifiers
learn the projection (AP/portable vs PA), laterality markers and patient position instead of
the lungs; in the public collections COVID images are mostly AP films of older patients.
Three questions, each with a patient-bootstrap interval and the n behind it:

1. **Subgroup metrics** (`subgroup_metrics`): AUC, sensitivity, specificity, ... per view
   (whatever the manifest's ``view`` holds: PA, AP, supine, lateral), sex and age band
   (`AGE_BANDS`: <18, 18–39, 40–64, ≥65).
2. **Is the label predictable from metadata alone?** (`metadata_only_auc`): a logistic
   regression on one-hot view, sex and age band, fitted on the run's training patients and
   scored on its (patient-disjoint) test patients — the metadata analogue of
   `covidcxr.evaluate.cross_source.source_only_auc`. A model that does no better reads
   metadata, not disease.
3. **Within a label, does the score depend on the view?** (`view_dependence`): the AUC with
   which the model's probability separates the two commonest views *among images of the same
   label* (pairs are only formed within a label, a stratified C statistic), oriented so that
   values above 0.5 mean the view that was commoner among training positives scores higher;
   and, from the training split, the difference in that view's rate between positives and
   negatives (``label_view_association``: a view can only be a shortcut where it was linked to
   the label).

`label_mix` answers whether the training sources share one label mix (a source probe matters
only where they do not). `confounders` runs 1–3 for the audit.

Example:
    >>> out = confounders(test_rows, train_rows, threshold=0.5, n_boot=200)   # doctest: +SKIP
    >>> out["view_dependence"]["estimate"], out["metadata_only"]["estimate"]   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.evaluate.cross_source import _pair_weighted_auc, json_ready, metrics_for_rows
from covidcxr.evaluate.metrics import bootstrap_ci

__all__ = ["AGE_BANDS", "SUBGROUP_COLUMNS", "age_band", "confounders", "label_mix", "metadata_only_auc", "subgroup_metrics", "view_dependence"]

#: (label, lower bound inclusive, upper bound exclusive) in years
AGE_BANDS = (("<18", 0.0, 18.0), ("18-39", 18.0, 40.0), ("40-64", 40.0, 65.0), (">=65", 65.0, float("inf")))
#: the attributes subgroup metrics are computed for (``age_band`` is derived from ``age``)
SUBGROUP_COLUMNS = ("view", "sex", "age_band")
#: the label-mix difference (max - min positive rate) below which sources count as sharing one mix
MIX_DIFFERENCE = 0.10
MIX_ALPHA = 0.05
UNKNOWN = "unknown"


def age_band(ages: Any) -> pd.Series:
    """Age in years → `AGE_BANDS` label (``"unknown"`` when missing or not a number).

    Example:
        >>> age_band([5, 30, 64, 65, None]).tolist()
        ['<18', '18-39', '40-64', '>=65', 'unknown']
    """
    values = pd.to_numeric(pd.Series(ages), errors="coerce")
    out = pd.Series(UNKNOWN, index=values.index, dtype=object)
    for name, low, high in AGE_BANDS:
        out[(values >= low) & (values < high)] = name
    return out


def _metadata(rows: pd.DataFrame) -> pd.DataFrame:
    """``view``, ``sex``, ``age_band`` as clean strings (``unknown`` where missing)."""
    out = pd.DataFrame(index=rows.index)
    for column in ("view", "sex"):
        values = rows[column] if column in rows.columns else pd.Series(None, index=rows.index, dtype=object)
        out[column] = values.map(lambda v: UNKNOWN if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "" else str(v).strip())
    out["age_band"] = age_band(rows["age"] if "age" in rows.columns else [None] * len(rows)).to_numpy()
    return out


def subgroup_metrics(rows: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, by: Sequence[str] = SUBGROUP_COLUMNS) -> dict[str, dict[str, Any]]:
    """Metrics with patient-bootstrap CIs per subgroup of each attribute in ``by``.

    Args:
        rows: test rows: ``patient_id``, ``target``, ``probability`` and ``view``/``sex``/``age``
            (missing columns or values form the ``unknown`` group).
        threshold: the run's operating threshold.

    Returns:
        ``{attribute: {group: metrics_for_rows}}`` (a one-class group has AUC None and a ``note``).
    """
    meta = _metadata(rows)
    out: dict[str, dict[str, Any]] = {}
    for attribute in by:
        groups = meta[attribute]
        out[attribute] = {str(g): metrics_for_rows(rows[groups == g], threshold, n_boot, seed) for g in sorted(groups.unique())}
    return json_ready(out)


def label_mix(train_rows: pd.DataFrame) -> dict[str, Any]:
    """Do the training sources share one label mix? (a chi-square test of source × label).

    Returns:
        ``{positive_rate: {source: rate}, n_images: {source: n}, p_value, max_difference,
        differs}`` — ``differs`` when the positive rates span more than `MIX_DIFFERENCE` and
        the chi-square p is below `MIX_ALPHA` (None with one source).
    """
    from scipy.stats import chi2_contingency

    rates = train_rows.groupby("source")["target"].mean()
    counts = train_rows.groupby("source").size()
    out: dict[str, Any] = {"positive_rate": {str(k): float(v) for k, v in rates.items()}, "n_images": {str(k): int(v) for k, v in counts.items()}}
    if len(rates) < 2:
        return {**out, "p_value": None, "max_difference": 0.0, "differs": None}
    table = pd.crosstab(train_rows["source"], train_rows["target"])
    p = float(chi2_contingency(table)[1]) if table.shape[1] == 2 else 0.0
    spread = float(rates.max() - rates.min())
    return json_ready({**out, "p_value": p, "max_difference": spread, "differs": bool(spread > MIX_DIFFERENCE and p < MIX_ALPHA)})


def _roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def metadata_only_auc(train_rows: pd.DataFrame, test_rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC of a logistic regression predicting the label from view, sex and age band alone.

    Fitted on the training patients, scored on the test patients (the run's split is
    patient-disjoint, so this is the held-out estimate a grouped cross-validation would
    approximate) with a patient-bootstrap CI (scikit-learn ``OneHotEncoder`` +
    ``LogisticRegression``).

    Returns:
        ``{estimate, low, high, n_images, n_patients, features}`` or ``{"skipped": reason}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    train_meta, test_meta = _metadata(train_rows), _metadata(test_rows)
    features = [c for c in SUBGROUP_COLUMNS if train_meta[c].nunique() > 1]
    y_train = train_rows["target"].to_numpy().astype(np.int64)
    y_test = test_rows["target"].to_numpy().astype(np.int64)
    if not features:
        return {"skipped": "view, sex and age take one value (or are missing) in the training split"}
    if len(np.unique(y_train)) < 2 or len(np.unique(y_test)) < 2:
        return {"skipped": "the training or test split holds one class"}
    model = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression(max_iter=1000))
    model.fit(train_meta[features].to_numpy(), y_train)
    score = model.predict_proba(test_meta[features].to_numpy())[:, 1]
    ci = bootstrap_ci(y_test, score, test_rows["patient_id"].astype(str).to_numpy(), _roc_auc, n_boot=n_boot, seed=seed)
    return json_ready({**ci, "features": features})


def _association(train_rows: pd.DataFrame, view: str, n_boot: int, seed: int) -> dict[str, Any] | None:
    """P(view | positive) - P(view | negative) in the training split, patient-bootstrap CI."""
    is_view = (_metadata(train_rows)["view"] == view).to_numpy().astype(np.float64)
    y = train_rows["target"].to_numpy().astype(np.int64)
    if len(np.unique(y)) < 2:
        return None

    def difference(yy: np.ndarray, vv: np.ndarray) -> float:
        if yy.min() == yy.max():
            raise ValueError("one class")
        return float(vv[yy == 1].mean() - vv[yy == 0].mean())

    return bootstrap_ci(y, is_view, train_rows["patient_id"].astype(str).to_numpy(), difference, n_boot=n_boot, seed=seed)


def view_dependence(test_rows: pd.DataFrame, train_rows: pd.DataFrame | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Within one label, how well the model's score separates the two commonest views.

    Args:
        test_rows: ``view``, ``target``, ``probability``, ``patient_id``.
        train_rows: the training split (``view``, ``target``, ``patient_id``): orients the
            AUC and gives ``label_view_association``; None leaves the views in name order.

    Returns:
        ``{estimate, low, high, n_images, n_patients, views: [a, b], label_view_association}``
        (AUC > 0.5: view ``a`` — the one commoner among training positives — scores higher
        within a label) or ``{"skipped": reason}``.
    """
    meta = _metadata(test_rows)["view"]
    known = meta[meta != UNKNOWN]
    if known.nunique() < 2:
        return {"skipped": "fewer than two known views in the test images"}
    views = sorted(known.value_counts().index[:2].tolist())
    association = None
    if train_rows is not None and len(train_rows):
        a_first = _association(train_rows, views[0], n_boot, seed)
        if a_first is not None and a_first["estimate"] < 0:  # orient: view a is the commoner among positives
            views = views[::-1]
            a_first = _association(train_rows, views[0], n_boot, seed)
        association = a_first
    keep = meta.isin(views).to_numpy()
    rows = test_rows[keep]
    is_a = (meta[keep] == views[0]).to_numpy().astype(np.int64)
    score = rows["probability"].to_numpy().astype(np.float64)
    label = rows["target"].to_numpy()
    try:
        _pair_weighted_auc(is_a, score, label)
    except ValueError:
        return {"skipped": f"no label holds both {views[0]} and {views[1]} test images"}

    # bootstrap_ci passes (is_a, scores); row indices travel as scores so the stratum (label) follows the draw
    def resampled(_is_a: np.ndarray, index: np.ndarray) -> float:
        drawn = index.astype(np.int64)
        return _pair_weighted_auc(is_a[drawn], score[drawn], label[drawn])

    ci = bootstrap_ci(is_a, np.arange(len(rows), dtype=np.float64), rows["patient_id"].astype(str).to_numpy(), resampled, n_boot=n_boot, seed=seed)
    return json_ready({**ci, "views": views, "label_view_association": association})


def confounders(test_rows: pd.DataFrame, train_rows: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Subgroup metrics, the metadata-only baseline and view dependence of one run's test set.

    Returns:
        ``{"subgroups": subgroup_metrics, "metadata_only": metadata_only_auc,
        "view_dependence": view_dependence}``.
    """
    return {
        "subgroups": subgroup_metrics(test_rows, threshold, n_boot, seed),
        "metadata_only": metadata_only_auc(train_rows, test_rows, n_boot, seed),
        "view_dependence": view_dependence(test_rows, train_rows, n_boot, seed),
    }
