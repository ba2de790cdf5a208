"""Cross-source evaluation of a trained run: per-source metrics, seen vs unseen sources.

A classifier trained on images from some sources (``seen``) is scored separately on
each test source and on the test sources it never saw (``unseen``); a large seen/unseen
AUC gap is the signature of shortcut learning (Maguolo & Nanni 2021; DeGrave et al. 2021).

Inputs are a run directory written by :func:`covidcxr.train.train_recipe`::

    RUN/config.yaml          data.sources, data.negatives_from
    RUN/manifest.parquet     the records used, with their split (train/val/test)
    RUN/predictions.parquet  split, source, patient_id, target, probability
    RUN/operating_point.json the threshold (chosen on validation; the default here)

(every path through `covidcxr.rundir.RunDir`).

Example::

    >>> from covidcxr.evaluate.cross_source import evaluate_run
    >>> report = evaluate_run("runs/small_shared", n_boot=200)      # doctest: +SKIP
    >>> report["per_source"]["cohen"]["auc"]["estimate"]            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.metrics import (
    BINARY_METRIC_NAMES,
    MetricInputError,
    binary_metrics_with_ci,
    bootstrap_ci,
    confusion_counts,
    metrics_from_counts,
    proportion_ci,
)
from covidcxr.evaluate.stats import delong_test_independent
from covidcxr.rundir import RunDir

__all__ = [
    "EVALUATION_FILE",
    "cross_source_matrix",
    "cross_source_table",
    "evaluate_predictions",
    "evaluate_run",
    "json_ready",
    "load_predictions",
    "metrics_for_rows",
    "per_source_metrics",
    "seen_unseen",
    "source_only_auc",
    "training_sources",
    "within_source_auc",
    "within_source_by_seen",
]

EVALUATION_FILE = RunDir.EVALUATION
_REQUIRED = ("split", "source", "patient_id", "target", "probability")
_ONE_CLASS_METRICS = {  # metrics defined when only one class is present
    1: ("sensitivity", "accuracy"),
    0: ("specificity", "accuracy"),
}


# --------------------------------------------------------------------------- helpers


def json_ready(value: Any) -> Any:
    """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_predictions(predictions: pd.DataFrame, where: str = "predictions") -> None:
    if not isinstance(predictions, pd.DataFrame):
        raise CovidCXRError(f"{where}: expected a pandas DataFrame, got {type(predictions).__name__}")
    missing = [c for c in _REQUIRED if c not in predictions.columns]
    if missing:
        raise CovidCXRError(
            f"{where}: missing column(s) {', '.join(missing)} (expected {', '.join(_REQUIRED)}; "
            "cross-source evaluation needs a binary run with a 'probability' column)"
        )


def _split_rows(predictions: pd.DataFrame, split: str | None) -> pd.DataFrame:
    _check_predictions(predictions)
    return predictions if split is None else predictions[predictions["split"] == split]


def _one_class_metrics(y: np.ndarray, s: np.ndarray, patients: np.ndarray, threshold: float, n_boot: int, seed: int, note: str) -> dict[str, Any]:
    """The structure of :func:`binary_metrics_with_ci` for a one-class set: undefined metrics None."""
    cls = int(y[0])
    pred = (s >= threshold).astype(np.int64)
    counts = confusion_counts(y, pred)
    point = metrics_from_counts(**counts)
    out: dict[str, Any] = {}
    for name in BINARY_METRIC_NAMES:
        if name in _ONE_CLASS_METRICS[cls]:
            # a one-class set: sensitivity/specificity/accuracy are all the fraction decided as that class
            ci = proportion_ci(pred == cls, patients)
            out[name] = {k: ci[k] for k in ("low", "high", "method", "n_effective", "design_effect")} | {"estimate": point[name]}
        else:
            out[name] = None
    out["dor_corrected"] = False
    out.update(counts)
    out["threshold"] = float(threshold)
    out.update({"n_images": int(y.size), "n_patients": int(pd.unique(patients).size), "n_boot": int(n_boot), "alpha": 0.05})
    out["note"] = note
    return out


def metrics_for_rows(rows: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Metrics with patient-bootstrap CIs of some prediction rows, never raising on one class.

    Returns:
        :func:`binary_metrics_with_ci`'s dict plus ``n_positive``, ``n_negative`` and
        ``note`` (None normally). With one class only, AUC (and every metric needing both
        classes) is None and ``note`` says why; sensitivity or specificity and accuracy
        are still given. None for no rows.
    """
    if len(rows) == 0:
        return None
    y = rows["target"].to_numpy().astype(np.int64)
    s = rows["probability"].to_numpy().astype(np.float64)
    patients = rows["patient_id"].astype(str).to_numpy()
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "positive (1)" if n_neg == 0 else "negative (0)"
        note = (
            f"only {present} images ({y.size}): AUC, balanced accuracy, DOR and the metrics of the "
            "missing class are undefined"
        )
        out = _one_class_metrics(y, s, patients, threshold, n_boot, seed, note)
    else:
        out = binary_metrics_with_ci(y, s, patients, threshold=threshold, n_boot=n_boot, seed=seed)
        out["note"] = None
    out["n_positive"] = n_pos
    out["n_negative"] = n_neg
    return json_ready(out)


# --------------------------------------------------------------------------- per source, seen/unseen


def per_source_metrics(predictions: pd.DataFrame, split: str = "test", threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Metrics with patient-level bootstrap CIs for each source, on the rows of one split.

    Args:
        predictions: a run's ``predictions.parquet`` (split, source, patient_id, target, probability).
        split: the split to score (``None``: all rows).
        threshold: ``probability >= threshold`` is predicted positive.
        n_boot: bootstrap resamples; seed: their seed.

    Returns:
        ``{source: metrics}`` sorted by source; see :func:`metrics_for_rows` (a one-class
        source has ``auc`` None and a ``note``).
    """
    rows = _split_rows(predictions, split)
    return {str(source): metrics_for_rows(part, threshold, n_boot, seed) for source, part in sorted(rows.groupby("source", sort=True), key=lambda kv: str(kv[0]))}


def _pair_weighted_auc(y: np.ndarray, s: np.ndarray, strata: np.ndarray) -> float:
    """Share of concordant (positive, negative) pairs *within the same stratum* (ties count half)."""
    concordant = 0.0
    pairs = 0.0
    for stratum in np.unique(strata):
        inside = strata == stratum
        yy, ss = y[inside], s[inside]
        n_pos = int(yy.sum())
        n_neg = int(yy.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            continue
        # Mann-Whitney U from midranks: U = sum of positive ranks - n_pos (n_pos + 1) / 2
        ranks = pd.Series(ss).rank(method="average").to_numpy()
        concordant += float(ranks[yy == 1].sum() - n_pos * (n_pos + 1) / 2.0)
        pairs += float(n_pos * n_neg)
    if pairs == 0:
        raise ValueError("no stratum holds both classes")
    return concordant / pairs


def within_source_auc(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """AUC over (positive, negative) pairs from the same source only, with a patient-bootstrap CI.

    The pooled AUC of a multi-source test set rewards a model for telling sources apart
    whenever the label's prevalence differs between sources (a COVID-only source beside a
    normal-only one gives a source detector AUC near 1). Counting only pairs drawn from
    one source removes that credit: it is the pair-weighted mean of the per-source AUCs
    (a stratified C statistic), and sources holding one class contribute nothing.

    Args:
        rows: ``source``, ``patient_id``, ``target`` and ``probability`` columns.

    Returns:
        ``{estimate, low, high, n_images, n_patients, sources}`` (``sources``: those with
        both classes), or None when no source holds both classes.
    """
    y = rows["target"].to_numpy().astype(np.int64)
    s = rows["probability"].to_numpy().astype(np.float64)
    strata = rows["source"].astype(str).to_numpy()
    both = sorted(src for src, part in rows.groupby("source") if 0 < int(part["target"].sum()) < len(part))
    if not both:
        return None

    # bootstrap_ci resamples patients and passes (labels, scores); the row indices travel
    # as the scores so the stratified AUC can see each resampled row's source.
    def resampled(_labels: np.ndarray, index: np.ndarray) -> float:
        rows_drawn = index.astype(np.int64)
        return _pair_weighted_auc(y[rows_drawn], s[rows_drawn], strata[rows_drawn])

    ci = bootstrap_ci(y, np.arange(len(y), dtype=np.float64), rows["patient_id"].astype(str).to_numpy(), resampled, n_boot=n_boot, seed=seed)
    return json_ready({**ci, "sources": both})


def within_source_by_seen(rows: pd.DataFrame, seen_sources: Iterable[str], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`within_source_auc` over the sources the model trained on and, apart, over the others.

    A low within-source AUC at the *training* sources says the model separates sources, not
    diagnoses (a source shortcut); a low AUC at *unseen* sources is domain shift — the model
    fails to carry over — and pooling the two hides which one happened (an unseen site supplying
    most of the pairs can pull a seen-site AUC of 0.82 down to 0.53).

    Args:
        rows: test rows with ``source``, ``patient_id``, ``target`` and ``probability``.
        seen_sources: the run's training sources (`training_sources`).

    Returns:
        ``{"seen": within_source_auc | None, "unseen": within_source_auc | None}``.

    Example:
        >>> parts = within_source_by_seen(test_rows, ["site_a", "site_b"])   # doctest: +SKIP
        >>> parts["seen"]["estimate"], parts["unseen"]["sources"]              # doctest: +SKIP
        (0.82, ['site_c'])
    """
    seen_set = {str(s) for s in seen_sources}
    is_seen = rows["source"].astype(str).isin(seen_set).to_numpy()
    return {
        "seen": within_source_auc(rows[is_seen], n_boot, seed) if is_seen.any() else None,
        "unseen": within_source_auc(rows[~is_seen], n_boot, seed) if (~is_seen).any() else None,
    }


def source_only_auc(test_rows: pd.DataFrame, train_rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The AUC a model would reach by recognising the source and nothing else.

    Each test image is scored by its source's positive rate in ``train_rows`` (a source
    absent from training gets the overall training rate). When this baseline is high, the
    data let a source detector pass for a diagnostic model (Maguolo & Nanni 2021).

    Returns:
        ``{estimate, low, high, n_images, n_patients, prevalence}`` (``prevalence``: the
        training positive rate per source), or None when the test rows hold one class.
    """
    if len(test_rows) == 0 or test_rows["target"].nunique() < 2 or len(train_rows) == 0:
        return None
    prevalence = train_rows.groupby("source")["target"].mean()
    overall = float(train_rows["target"].mean())
    score = test_rows["source"].map(prevalence).fillna(overall).to_numpy().astype(np.float64)
    y = test_rows["target"].to_numpy().astype(np.int64)
    ci = bootstrap_ci(y, score, test_rows["patient_id"].astype(str).to_numpy(), _roc_auc, n_boot=n_boot, seed=seed)
    return json_ready({**ci, "prevalence": {str(k): float(v) for k, v in prevalence.items()}})


def _roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def _gap(seen_rows: pd.DataFrame, unseen_rows: pd.DataFrame) -> dict[str, Any]:
    empty = {"auc_seen": None, "auc_unseen": None, "auc_diff": None, "z": None, "p_value": None}
    if len(seen_rows) == 0 or len(unseen_rows) == 0:
        which = "seen" if len(seen_rows) == 0 else "unseen"
        return {**empty, "note": f"no test images from {which} sources: the gap is undefined"}
    try:
        r = delong_test_independent(
            seen_rows["target"].to_numpy().astype(np.int64), seen_rows["probability"].to_numpy().astype(np.float64),
            unseen_rows["target"].to_numpy().astype(np.int64), unseen_rows["probability"].to_numpy().astype(np.float64),
        )
    except MetricInputError as exc:
        which = "seen" if exc.argument.endswith("_a") else "unseen"
        return {**empty, "note": f"{which} group: {exc.reason}"}
    return json_ready({
        "auc_seen": r["auc_a"], "auc_unseen": r["auc_b"], "auc_diff": r["auc_diff"], "z": r["z"], "p_value": r["p_value"],
        "note": "auc_diff = seen - unseen; DeLong test for two independent test sets (images treated as independent)",
    })


def seen_unseen(predictions: pd.DataFrame, seen_sources: Iterable[str], split: str = "test", threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics on test images of sources the model trained on (seen) vs the others (unseen).

    Returns:
        ``{"seen_sources", "unseen_sources", "seen", "unseen", "gap"}``: ``seen``/``unseen``
        are :func:`metrics_for_rows` dicts (None when the group has no images);
        ``gap`` = ``{auc_seen, auc_unseen, auc_diff, z, p_value, note}`` from
        :func:`~covidcxr.evaluate.stats.delong_test_independent`, values None (with the
        reason in ``note``) when a group is empty or lacks a class.
    """
    seen_set = {str(s) for s in seen_sources}
    rows = _split_rows(predictions, split)
    is_seen = rows["source"].astype(str).isin(seen_set)
    seen_rows, unseen_rows = rows[is_seen], rows[~is_seen]
    return {
        "seen_sources": sorted(seen_rows["source"].astype(str).unique().tolist()),
        "unseen_sources": sorted(unseen_rows["source"].astype(str).unique().tolist()),
        "seen": metrics_for_rows(seen_rows, threshold, n_boot, seed),
        "unseen": metrics_for_rows(unseen_rows, threshold, n_boot, seed),
        "gap": _gap(seen_rows, unseen_rows),
    }


# --------------------------------------------------------------------------- run directories


def _run_path(run_dir: str | Path) -> Path:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CovidCXRError(f"{run.path}: not a run directory (expected a folder written by `covidcxr train`, holding predictions.parquet)")
    if not run.predictions.is_file():
        raise CovidCXRError(f"{run.path}: no predictions.parquet (expected a finished run of `covidcxr train`)")
    return run.path


def load_predictions(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``predictions.parquet``, checked for the columns cross-source evaluation needs."""
    run = RunDir(_run_path(run_dir))
    frame = run.read_predictions()
    _check_predictions(frame, str(run.predictions))
    return frame


def training_sources(run_dir: str | Path) -> list[str]:
    """Sources a run trained on (its ``seen`` sources): `covidcxr.rundir.RunDir.seen_sources`.

    Preferred: the sources of the train/val rows of ``manifest.parquet`` (what was actually
    used). A k-fold run's root has no manifest: its ``fold-*/manifest.parquet`` are pooled.
    Fallback: ``data.sources`` + ``data.negatives_from`` of ``config.yaml``.

    Raises:
        CovidCXRError: neither a manifest nor a config names any source.
    """
    return RunDir(run_dir).seen_sources()


def _training_rows(run_dir: Path, predictions: pd.DataFrame) -> pd.DataFrame:
    """The run's training rows (``source``, ``target``): manifest.parquet's, else the predictions'."""
    run = RunDir(run_dir)
    if run.manifest.is_file():
        frame = run.read_manifest()
        if {"split", "source", "target"} <= set(frame.columns):
            return frame[frame["split"] == "train"]
    return predictions[predictions["split"] == "train"]


def _within_source_parts(test: pd.DataFrame, sources: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    parts = within_source_by_seen(test, sources, n_boot, seed)
    return {"within_source": parts["seen"], "within_source_unseen": parts["unseen"]}


def evaluate_predictions(
    test: pd.DataFrame, train_rows: pd.DataFrame, seen_sources: Sequence[str], threshold: float = 0.5, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The evaluation of some scored test images: the one body behind every ``evaluation.json``.

    A run's own test split (:func:`evaluate_run`), a run scored on another collection
    (`covidcxr.evaluate.external`) and a CSV of someone's predictions
    (`covidcxr.audit.run.audit_predictions`) all go through here, so the same scores give the
    same numbers whichever way they arrived.

    Args:
        test: ``(N,)`` scored rows: ``source``, ``patient_id``, ``target`` (0/1), ``probability``.
        train_rows: the model's training rows (``source``, ``target``) for the source-only
            baseline; empty when unknown (the baseline is then None).
        seen_sources: the model's training sources.
        threshold: ``probability >= threshold`` is positive.
        n_boot, seed: the patient bootstrap behind the bootstrap intervals.

    Returns:
        ``{split, training_sources, overall, per_source, seen_unseen, within_source,
        within_source_unseen, source_only, threshold}``.

    Example:
        >>> part = evaluate_predictions(scored, train_rows, ["cohen", "kermany"])   # doctest: +SKIP
        >>> part["per_source"]["nih"]["auc"]                                         # doctest: +SKIP
    """
    test = test.assign(split="test")
    sources = sorted(str(s) for s in seen_sources)
    return {
        "split": "test",
        "training_sources": sources,
        "overall": metrics_for_rows(test, threshold, n_boot, seed),
        "per_source": per_source_metrics(test, "test", threshold, n_boot, seed),
        "seen_unseen": seen_unseen(test, sources, "test", threshold, n_boot, seed),
        **_within_source_parts(test, sources, n_boot, seed),
        "source_only": source_only_auc(test, train_rows, n_boot, seed),
        "threshold": float(threshold),
    }


def evaluate_run(run_dir: str | Path, threshold: float | None = None, n_boot: int = 1000, seed: int = 0, write: bool = True) -> dict[str, Any]:
    """Cross-source evaluation of one run's test predictions; written to ``RUN/evaluation.json``.

    Args:
        run_dir: a run directory (a k-fold root: its pooled out-of-fold predictions).
        threshold: decision threshold; None (default): the run's operating point
            (`covidcxr.rundir.RunDir.operating_point`, 0.5 with rule ``legacy-0.5`` for a
            run that stored none).
        n_boot, seed: the patient bootstrap behind the intervals.
        write: write ``RUN/evaluation.json``.

    Returns:
        ``{run, run_dir, training_sources, overall, per_source, seen_unseen, threshold,
        operating_point, n_boot, seed, split}`` — ``operating_point`` is the run's stored
        one (with ``used: true`` when ``threshold`` is it), ``overall`` the whole test split, ``per_source`` by
        :func:`per_source_metrics`, ``seen_unseen`` by :func:`seen_unseen` with the run's
        :func:`training_sources` as seen, ``within_source`` (:func:`within_source_auc` over the
        seen sources only), ``within_source_unseen`` (the same over the unseen sources: domain
        shift, reported apart) and
        ``source_only`` (:func:`source_only_auc`, the training split's per-source rates).

    Raises:
        CovidCXRError: a missing run dir, a missing/unusable predictions.parquet, no test rows.
    """
    path = _run_path(run_dir)
    run = RunDir(path)
    point = run.operating_point()
    if threshold is None:
        threshold = run.threshold
    predictions = load_predictions(path)
    test = predictions[predictions["split"] == "test"]
    if len(test) == 0:
        raise CovidCXRError(f"{path / 'predictions.parquet'}: no rows with split 'test' (expected test-set predictions)")
    sources = training_sources(path)
    report = {
        "run": run.name,
        "run_dir": str(path),
        **evaluate_predictions(test, _training_rows(path, predictions), sources, threshold, n_boot, seed),
        "operating_point": {**point.to_dict(), "used": point.threshold is not None and math.isclose(float(point.threshold), float(threshold)), "describe": point.describe()},
        "n_boot": int(n_boot),
        "seed": int(seed),
    }
    report = json_ready(report)
    if write:
        run.write_evaluation(report)
    return report


# --------------------------------------------------------------------------- several runs


def _evaluations(runs: Sequence[str | Path | Mapping[str, Any]], threshold: float | None, n_boot: int, seed: int) -> list[Mapping[str, Any]]:
    return [r if isinstance(r, Mapping) else evaluate_run(r, threshold, n_boot, seed, write=False) for r in runs]


def _row_name(report: Mapping[str, Any]) -> str:
    return f"{report['run']} [{'+'.join(report['training_sources'])}]"


def cross_source_table(runs: Sequence[str | Path | Mapping[str, Any]], threshold: float | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long form of the train × test matrix: one row per (run, test source).

    Args:
        runs: run directories, or reports already made by :func:`evaluate_run`.

    Returns:
        Columns ``training, run, training_sources, test_source, seen, auc, auc_low,
        auc_high, n_images, n_patients, note``.
    """
    records = []
    used: dict[str, int] = {}
    for report in _evaluations(runs, threshold, n_boot, seed):
        seen = set(report["training_sources"])
        row = _row_name(report)
        used[row] = used.get(row, 0) + 1
        if used[row] > 1:  # two runs of one name: keep the rows apart
            row = f"{row} #{used[row]}"
        for source, m in report["per_source"].items():
            auc = m.get("auc") or {}
            records.append({
                "training": row,
                "run": report["run"],
                "training_sources": "+".join(report["training_sources"]),
                "test_source": source,
                "seen": source in seen,
                "auc": auc.get("estimate"),
                "auc_low": auc.get("low"),
                "auc_high": auc.get("high"),
                "n_images": m["n_images"],
                "n_patients": m["n_patients"],
                "note": m.get("note"),
            })
    columns = ["training", "run", "training_sources", "test_source", "seen", "auc", "auc_low", "auc_high", "n_images", "n_patients", "note"]
    return pd.DataFrame.from_records(records, columns=columns)


def cross_source_matrix(runs: Sequence[str | Path | Mapping[str, Any]], threshold: float | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Train × test AUC matrix: rows = run ``"name [training sources]"``, columns = test source.

    Cells are AUC estimates (NaN where a run has no test images of that source or the
    source holds one class). The long form with CIs and counts is :func:`cross_source_table`.
    """
    table = cross_source_table(runs, threshold, n_boot, seed)
    if table.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(table["training"]))
    wide = table.pivot(index="training", columns="test_source", values="auc").astype(float)
    wide = wide.reindex(order)
    wide.columns.name = "test_source"
    wide.index.name = "training"
    return wide
