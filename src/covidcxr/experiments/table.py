"""The grid's results as a Table-2-like table (Tartaglione et al. 2020), read from the run store.

Rows are the grid's axes (e.g. pretrain x composition x architecture), columns the test
sources; each cell holds AUC [95 % CI], sensitivity, specificity, balanced accuracy and
the diagnostic odds ratio, and says whether the run saw that source in training. A
second part pools each row's seen sources and unseen sources (the DeLong test of the AUC
gap, Fisher's exact test of the accuracy gap).

Rows that group several runs are computed from the stored per-image predictions:

* folds of a k-fold point (Hall et al., Apostolopoulos & Mpesiana: 10-fold CV): a seen
  source's images are each tested by the one fold that held them out (out-of-fold); an
  unseen source's images are tested by every fold model and their probabilities averaged;
* an ensemble axis (``experiment.ensembles``, e.g. Hall et al.'s ResNet-50 + VGG-16 +
  small CNN): the members' probabilities averaged per image, on the images every member
  was tested on; the row's label on that axis is ``ensemble``.

A single run's row comes from its stored metrics, computed when it finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.experiments.recipe import ExperimentRecipe
from covidcxr.experiments.store import POOLED, RunStore, metric_row

__all__ = [
    "BaselineTable", "GridTable", "baseline_cell", "baseline_header", "baseline_table", "cell_text", "fmt_number", "fmt_p", "grid_table",
    "markdown_baseline_table", "markdown_table", "paired_auc_difference", "wide_cells",
]

CELL_METRICS = ("auc", "auc_low", "auc_high", "sensitivity", "specificity", "balanced_accuracy", "dor")


@dataclass
class GridTable:
    """The long-form results of a grid.

    Attributes:
        experiment: the experiment's label.
        axes: the row axes, in order (the fold axis is pooled, not a row axis).
        sources: the test sources, in column order.
        cells: one row per (grid row, test source): the axes' labels, ``test_source``,
            ``seen``, ``n_images``, ``n_patients``, ``n_positive``, ``n_negative``, the
            metrics of `CELL_METRICS`, ``note``, ``runs`` (how many runs the row pools).
        pooled: one row per grid row: ``seen_auc``, ``unseen_auc``, ``auc_gap``,
            ``auc_gap_p`` (DeLong), ``seen_accuracy``, ``unseen_accuracy``,
            ``accuracy_gap_p`` (Fisher), ``seen_specificity``, ``unseen_specificity``,
            ``runs_done``, ``runs_total``; for multi-class runs also ``seen_`` and
            ``unseen_`` ``accuracy_3class``, ``accuracy_2class`` (Apostolopoulos &
            Mpesiana's 3-/2-class accuracy) and ``confusion`` (rows true, columns
            predicted, in the task's class order).
        adaptation: Ben Ahmed et al.'s Table 4, one row per adapted point, source and class:
            ``n``, ``before``, ``after`` (accuracy on the same test images), ``mcnemar_p``,
            ``auc_before``, ``auc_after``, ``delong_p``.
    """

    experiment: str
    axes: list[str]
    sources: list[str]
    cells: pd.DataFrame
    pooled: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    adaptation: pd.DataFrame = field(default_factory=pd.DataFrame)


def _pool_predictions(frame: pd.DataFrame, require_all: int | None = None) -> pd.DataFrame:
    """One row per image: probabilities averaged over the runs that tested it.

    ``require_all``: keep only images tested by that many runs (an ensemble's members).
    """
    if frame.empty:
        return frame
    grouped = frame.groupby("image", sort=False)
    first = grouped.first()
    first["probability"] = grouped["probability"].mean()
    first["n_runs"] = grouped["run_id"].nunique()
    if require_all is not None:
        first = first[first["n_runs"] == require_all]
    return first.reset_index()


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    """Stored predictions -> the frame `testsets` metrics read (``positive``, ``probability``, ``seen``...)."""
    out = frame.copy()
    out["seen"] = out["seen"].astype(bool)
    return out


def _pooled_threshold(threshold: float | None, runs: pd.DataFrame) -> tuple[float, str | None]:
    """The threshold of a row pooling several runs: ``experiment.threshold``, else the runs' own.

    Runs at one operating point share it; runs whose operating points differ (each chose
    its own on validation) are pooled at the median of theirs, and the note says so.
    """
    if threshold is not None:
        return float(threshold), None
    own = []
    for text in runs["summary"]:
        summary = json.loads(text) if isinstance(text, str) else {}
        if summary.get("threshold") is not None:
            own.append(float(summary["threshold"]))
    if not own:
        return 0.5, "the runs stored no threshold: 0.5"
    if max(own) - min(own) < 1e-12:
        return own[0], None
    median = float(np.median(own))
    return median, f"the pooled runs chose different operating points ({', '.join(f'{t:.3g}' for t in own)}); pooled at their median {median:.3g}"


def _metrics_from_predictions(predictions: pd.DataFrame, threshold: float, n_boot: int, seed: int, classes: list[str] | None, note: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from covidcxr.experiments.testsets import pooled_metrics, source_metrics

    scored = _scored(predictions)
    per_source = source_metrics(scored, threshold=threshold, n_boot=n_boot, seed=seed, classes=classes)
    pooled = pooled_metrics(scored, threshold=threshold, n_boot=n_boot, seed=seed, classes=classes)
    rows = []
    for source, metrics in per_source.items():
        seen = bool(scored.loc[scored["source"] == source, "seen"].iloc[0])
        rows.append(metric_row(0, source, "source", metrics, seen))
    for scope, name in POOLED.items():
        rows.append(metric_row(0, name, scope, pooled.get(scope), None))
    summary = {"auc_gap": pooled["gap"], "accuracy_gap": pooled["accuracy_gap"], "threshold": threshold}
    if note:
        summary["threshold_note"] = note
    return rows, summary


def _multiclass_of(row: dict[str, Any] | None) -> dict[str, Any]:
    """The ``multiclass`` part (3-/2-class accuracy, confusion) of a metrics row's details, if any."""
    details = (row or {}).get("details")
    if not isinstance(details, str):
        return {}
    try:
        return json.loads(details).get("multiclass") or {}
    except (ValueError, AttributeError):
        return {}


def _pooled_row(metric_rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> dict[str, Any]:
    by_scope = {row["scope"]: row for row in metric_rows if row["scope"] != "source"}
    gap = (summary or {}).get("auc_gap") or {}
    accuracy = (summary or {}).get("accuracy_gap") or {}
    multiclass = {}
    for scope in ("seen", "unseen"):
        found = _multiclass_of(by_scope.get(scope))
        for name in ("accuracy_3class", "accuracy_2class", "confusion"):
            if name in found:
                multiclass[f"{scope}_{name}"] = found[name]
    return {
        **multiclass,
        "seen_auc": by_scope.get("seen", {}).get("auc"),
        "unseen_auc": by_scope.get("unseen", {}).get("auc"),
        "auc_gap": gap.get("auc_diff"),
        "auc_gap_p": gap.get("p_value"),
        "seen_accuracy": accuracy.get("accuracy_seen"),
        "unseen_accuracy": accuracy.get("accuracy_unseen"),
        "accuracy_gap_p": accuracy.get("p_value"),
        "seen_specificity": by_scope.get("seen", {}).get("specificity"),
        "unseen_specificity": by_scope.get("unseen", {}).get("specificity"),
        "seen_sensitivity": by_scope.get("seen", {}).get("sensitivity"),
        "unseen_sensitivity": by_scope.get("unseen", {}).get("sensitivity"),
    }


def grid_table(experiment: ExperimentRecipe, store: RunStore) -> GridTable:
    """Build the table of an experiment's current expansion from the store.

    Rows whose runs are not all done are listed with what is done (``runs_done`` of
    ``runs_total``); a row with no finished run has no cells.
    """
    runs = store.find_runs(experiment)
    train = runs[runs["kind"] == "train"].copy()
    missing_all = runs.loc[runs["status"] != "done", "key"].tolist()
    axes = [a for a in experiment.axes]
    section = experiment.section
    classes = list(experiment.base_recipe.classes)
    seed = experiment.base_recipe.seed
    train["row"] = train["labels"].map(lambda labels: tuple(labels.get(a, "") for a in axes))
    groups: dict[tuple[str, ...], pd.DataFrame] = {row: part for row, part in train.groupby("row", sort=False)}
    ensembles = [a for a in section.ensembles if a in axes]
    done_ids = [int(i) for i in train.loc[train["status"] == "done", "id"].dropna()]
    metrics = store.metrics_frame(done_ids)
    needs_predictions = bool(ensembles) or any((part["status"] == "done").sum() > 1 for part in groups.values())
    predictions = store.predictions_frame(done_ids) if needs_predictions else pd.DataFrame()

    cell_rows: list[dict[str, Any]] = []
    pooled_rows: list[dict[str, Any]] = []

    def add(row_labels: tuple[str, ...], metric_rows: list[dict[str, Any]], summary: dict[str, Any] | None, done: int, total: int) -> None:
        labels = dict(zip(axes, row_labels))
        for m in metric_rows:
            if m["scope"] == "source":
                cell_rows.append({**labels, **{k: m.get(k) for k in ("test_source", "seen", "n_images", "n_patients", "n_positive", "n_negative", *CELL_METRICS, "note")}, "runs": done})
        pooled_rows.append({**labels, **_pooled_row(metric_rows, summary), "runs_done": done, "runs_total": total})

    for row_labels, part in groups.items():
        done = part[part["status"] == "done"]
        if done.empty:
            add(row_labels, [], None, 0, len(part))
            continue
        if len(part) == 1:
            run_id = int(done["id"].iloc[0])
            stored = metrics[metrics["run_id"] == run_id].to_dict("records")
            summary_text = done["summary"].iloc[0]
            add(row_labels, stored, json.loads(summary_text) if isinstance(summary_text, str) else None, 1, 1)
            continue
        pooled = _pool_predictions(predictions[predictions["run_id"].isin(done["id"].astype(int))])
        threshold, note = _pooled_threshold(section.threshold, done)
        rows, summary = _metrics_from_predictions(pooled, threshold, section.n_boot, seed, classes, note)
        add(row_labels, rows, summary, len(done), len(part))

    for axis in ensembles:
        position = axes.index(axis)
        others: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for row_labels in groups:
            key = row_labels[:position] + row_labels[position + 1 :]
            others.setdefault(key, []).append(row_labels)
        for key, members in others.items():
            if len(members) < 2:
                continue
            member_ids = [set(groups[m].loc[groups[m]["status"] == "done", "id"].astype(int)) for m in members]
            total = sum(len(groups[m]) for m in members)
            ensemble_labels = key[:position] + ("ensemble",) + key[position:]
            if not all(member_ids) or sum(len(ids) for ids in member_ids) < total:
                add(ensemble_labels, [], None, sum(len(ids) for ids in member_ids), total)
                continue
            # each member first pooled over its folds, then the members averaged per image
            per_member = []
            for index, ids in enumerate(member_ids):
                member = _pool_predictions(predictions[predictions["run_id"].isin(ids)])
                member["run_id"] = index
                per_member.append(member)
            combined = _pool_predictions(pd.concat(per_member, ignore_index=True), require_all=len(members))
            threshold, note = _pooled_threshold(section.threshold, pd.concat([groups[m][groups[m]["status"] == "done"] for m in members]))
            rows, summary = _metrics_from_predictions(combined, threshold, section.n_boot, seed, classes, note)
            add(ensemble_labels, rows, summary, total, total)

    adaptation_rows = []
    for run in runs[(runs["kind"] == "adapt") & (runs["status"] == "done")].itertuples(index=False):
        summary = json.loads(run.summary) if isinstance(run.summary, str) else {}
        result = summary.get("adaptation") or {}
        mcnemar = result.get("mcnemar") or {}
        delong = result.get("delong") or {}
        for row in result.get("rows", []):
            adaptation_rows.append({
                **{a: run.labels.get(a, "") for a in axes}, **row, "mcnemar_p": mcnemar.get("p_value"),
                "auc_before": delong.get("auc_a"), "auc_after": delong.get("auc_b"), "delong_p": delong.get("p_value"),
            })
    cells = pd.DataFrame(cell_rows, columns=[*axes, "test_source", "seen", "n_images", "n_patients", "n_positive", "n_negative", *CELL_METRICS, "note", "runs"])
    pooled_frame = pd.DataFrame(pooled_rows)
    order = list(dict.fromkeys(cells["test_source"])) if len(cells) else []
    missing = missing_all
    return GridTable(experiment=experiment.label, axes=axes, sources=order, cells=cells, pooled=pooled_frame, missing=missing, adaptation=pd.DataFrame(adaptation_rows))


# ---------------------------------------------------------------------------------- text


def fmt_number(value: Any, digits: int = 2) -> str:
    """``0.93`` (``digits`` decimals), or ``-`` for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _dor(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _defined(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _one_class(cell: dict[str, Any]) -> str:
    """Why a cell has no AUC: its test images hold one class only."""
    if not cell.get("n_positive"):
        return "no positives"
    if not cell.get("n_negative"):
        return "no negatives"
    return "undefined"


def cell_text(cell: dict[str, Any], separator: str = "\n") -> str:
    """``AUC [CI]`` / ``se sp`` / ``BA DOR`` of one cell (``*`` marks a source the run saw)."""
    if not isinstance(cell, dict):  # no cell (pandas may hold it as NaN)
        return "-"
    seen = "*" if cell.get("seen") else ""
    auc = f"AUC {fmt_number(cell.get('auc'))} [{fmt_number(cell.get('auc_low'))}, {fmt_number(cell.get('auc_high'))}]" if _defined(cell.get("auc")) else f"AUC - ({_one_class(cell)})"
    return separator.join([
        f"{auc}{seen}",
        f"se {fmt_number(cell.get('sensitivity'))} sp {fmt_number(cell.get('specificity'))}",
        f"BA {fmt_number(cell.get('balanced_accuracy'))} DOR {_dor(cell.get('dor'))} n={cell.get('n_images')}",
    ])


def wide_cells(table: GridTable) -> pd.DataFrame:
    """Rows = grid rows (axes' labels), columns = test sources, values = the cell dicts."""
    rows = table.pooled[table.axes].drop_duplicates() if len(table.pooled) else pd.DataFrame(columns=table.axes)
    out = []
    for _, labels in rows.iterrows():
        mask = np.ones(len(table.cells), dtype=bool)
        for axis in table.axes:
            mask &= (table.cells[axis] == labels[axis]).to_numpy()
        part = table.cells[mask]
        entry = {axis: labels[axis] for axis in table.axes}
        for source in table.sources:
            found = part[part["test_source"] == source]
            entry[source] = found.iloc[0].to_dict() if len(found) else None
        out.append(entry)
    return pd.DataFrame(out, columns=[*table.axes, *table.sources])


def markdown_table(table: GridTable) -> str:
    """The grid as Markdown: the per-source table, then the seen/unseen summary."""
    lines = [f"**{table.experiment}** — cells: AUC [95% CI] · sensitivity/specificity · balanced accuracy · DOR · n; `*` = a source the run trained on (seen)", ""]
    header = [*table.axes, *table.sources]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    wide = wide_cells(table)
    for _, row in wide.iterrows():
        cells = []
        for source in table.sources:
            cell = row[source]
            if not isinstance(cell, dict):  # not done yet (pandas may hold the missing cell as NaN)
                cells.append("")
                continue
            seen = "\\*" if cell.get("seen") else ""
            auc = f"{fmt_number(cell.get('auc'))} [{fmt_number(cell.get('auc_low'))}, {fmt_number(cell.get('auc_high'))}]" if _defined(cell.get("auc")) else f"- ({_one_class(cell)})"
            cells.append(f"{auc}{seen} · {fmt_number(cell.get('sensitivity'))}/{fmt_number(cell.get('specificity'))} · {fmt_number(cell.get('balanced_accuracy'))} · {_dor(cell.get('dor'))} · {cell.get('n_images')}")
        lines.append("| " + " | ".join([*(str(row[a]) for a in table.axes), *cells]) + " |")
    lines.append("")
    multiclass = [c for c in ("seen_accuracy_3class", "unseen_accuracy_3class", "seen_accuracy_2class", "unseen_accuracy_2class") if c in table.pooled.columns]
    summary_header = [*table.axes, "seen AUC", "unseen AUC", "gap (DeLong p)", "seen spec", "unseen spec", "seen acc", "unseen acc (Fisher p)", *(c.replace("_", " ") for c in multiclass), "runs"]
    lines.append("| " + " | ".join(summary_header) + " |")
    lines.append("|" + "---|" * len(summary_header))
    for _, row in table.pooled.iterrows():
        gap = f"{fmt_number(row.get('auc_gap'))} ({fmt_p(row.get('auc_gap_p'))})" if row.get("auc_gap") is not None else "-"
        acc = f"{fmt_number(row.get('unseen_accuracy'))} ({fmt_p(row.get('accuracy_gap_p'))})"
        lines.append("| " + " | ".join([
            *(str(row[a]) for a in table.axes), fmt_number(row.get("seen_auc")), fmt_number(row.get("unseen_auc")), gap,
            fmt_number(row.get("seen_specificity")), fmt_number(row.get("unseen_specificity")), fmt_number(row.get("seen_accuracy")), acc,
            *(fmt_number(row.get(c)) for c in multiclass), f"{int(row['runs_done'])}/{int(row['runs_total'])}",
        ]) + " |")
    if len(table.adaptation):
        lines += ["", "Local adaptation (Ben Ahmed et al. 2021, Table 4): accuracy on the same test images before and after fine-tuning on a few images of those sources", ""]
        header = [*table.axes, "source", "class", "n", "before", "after", "McNemar p", "AUC before", "AUC after", "DeLong p"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for _, row in table.adaptation.iterrows():
            lines.append("| " + " | ".join([
                *(str(row[a]) for a in table.axes), str(row["source"]), str(row["class"]), str(row["n"]), fmt_number(row["before"]), fmt_number(row["after"]),
                fmt_p(row.get("mcnemar_p")), fmt_number(row.get("auc_before")), fmt_number(row.get("auc_after")), fmt_p(row.get("delong_p")),
            ]) + " |")
    return "\n".join(lines) + "\n"


def fmt_p(value: Any) -> str:
    """A p-value: two significant digits, ``<0.001`` below that, ``-`` when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2g}" if value >= 1e-3 else "<0.001"


# ------------------------------------------------------------- against the baseline, within the held-out source

#: two-sided 95 % normal quantile of the interval of an AUC difference
_Z95 = 1.959963984540054


@dataclass
class BaselineTable:
    """Each point's AUC *within its held-out source*, and its difference to the baseline point.

    Attributes:
        experiment: the experiment's label.
        method_axis: the axis whose labels are the methods (e.g. ``method``).
        baseline: the baseline's label on that axis (e.g. ``baseline``).
        columns: the labels of the other axes, joined by ``/``, in grid order (one per
            held-out fold, e.g. ``nih``, ``kermany``, ``figure1``).
        rows: one row per grid point: ``column``, the method label, ``heldout_source``,
            ``status``, ``n_images``, ``n_patients``, ``n_positive``, ``n_negative``,
            ``auc``, ``auc_low``, ``auc_high`` (patient-bootstrap 95 % CI, stored when
            the point finished), ``delta`` (AUC − the baseline's AUC on the same images),
            ``delta_low``, ``delta_high`` (95 % interval: paired, patients clustered — `paired_auc_difference`), ``delta_p``,
            ``n_paired`` (images both runs scored), ``verdict`` (``RUN/audit/audit.json``,
            ``None`` when not audited), ``run_dir``.
    """

    experiment: str
    method_axis: str
    baseline: str
    columns: list[str]
    rows: pd.DataFrame


def paired_auc_difference(target: Any, score: Any, baseline_score: Any, patients: Any = None) -> dict[str, float]:
    """AUC(score) − AUC(baseline) on the same images, with a 95 % interval and p.

    With ``patients`` (the default of the baseline table): the paired difference with
    Obuchowski's clustered variance (`covidcxr.evaluate.stats.obuchowski_test`), so a
    patient's several images are not counted as independent evidence; without: DeLong's
    paired variance, ``var_a + var_b − 2 cov`` (`covidcxr.evaluate.stats.delong_test`),
    which treats images as independent. Coverage of both on clustered simulations:
    ``benchmarks/bench_coverage.py`` (``coverage.paired_auc_difference``).

    Args:
        target: (N,) 0/1 labels.
        score: (N,) the method's scores.
        baseline_score: (N,) the baseline's scores on the same images.
        patients: (N,) patient id of each image, or None.

    Returns:
        ``delta``, ``delta_low``, ``delta_high``, ``delta_p``, ``n_paired``, ``ci_method``.

    Example::

        >>> r = paired_auc_difference([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.1, 0.6, 0.4, 0.9])
        >>> r["delta"], r["ci_method"]
        (0.25, 'delong')
    """
    from covidcxr.evaluate.stats import delong_test, obuchowski_test

    if patients is None:
        result = delong_test(target, score, baseline_score)
        variance, method = result["var_a"] + result["var_b"] - 2.0 * result["covariance"], "delong"
    else:
        result = obuchowski_test(target, score, baseline_score, patients)
        variance, method = result["variance"], "obuchowski_clustered"
    half = _Z95 * math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else math.nan
    delta = result["auc_diff"]
    return {"delta": delta, "delta_low": delta - half, "delta_high": delta + half, "delta_p": result["p_value"], "n_paired": int(np.asarray(target).size), "ci_method": method}


def _heldout_source(point: Any) -> str:
    from covidcxr.errors import CovidCXRError

    split = point.recipe.data.split
    if split.kind != "loso":
        raise CovidCXRError(f"{point.key}: the baseline table compares AUCs within the held-out source; data.split.kind must be 'loso', not {split.kind!r}")
    return str(split.test_source)


def _pair(predictions: pd.DataFrame, run_id: int, base_id: int, source: str) -> dict[str, Any] | None:
    """The paired AUC difference of run ``run_id`` to ``base_id`` on the images of ``source`` both scored (patients clustered)."""
    from covidcxr.evaluate.metrics import MetricInputError

    mine = predictions[(predictions["run_id"] == run_id) & (predictions["source"] == source)]
    theirs = predictions[(predictions["run_id"] == base_id) & (predictions["source"] == source)]
    both = mine[["image", "patient_id", "positive", "probability"]].merge(theirs[["image", "probability"]], on="image", suffixes=("", "_base"))
    try:
        return paired_auc_difference(both["positive"].to_numpy(), both["probability"].to_numpy(), both["probability_base"].to_numpy(), both["patient_id"].to_numpy())
    except MetricInputError:  # one class among the paired images: no AUC, no difference
        return None


def baseline_table(experiment: ExperimentRecipe, store: RunStore, method_axis: str, baseline: str) -> BaselineTable:
    """The leave-one-source-out table: every point's AUC within its held-out source, against the baseline.

    Pooled numbers mix sources and reward recognising them; the number that counts for a
    method meant to generalize is the AUC *within* the source it never saw, and whether it
    beats the baseline trained on the same folds, scored on the same images (paired:
    DeLong's test of correlated AUCs, with Obuchowski's variance for patients' several images).

    Args:
        experiment: a grid of ``data.split.kind: loso`` points with a method axis.
        store: the run store.
        method_axis: the axis of methods, e.g. ``method``.
        baseline: its baseline label, e.g. ``baseline``; every other point is compared to
            the baseline point with the same labels on the other axes.

    Returns:
        A `BaselineTable` (points not yet done have ``status`` and no numbers).

    Raises:
        CovidCXRError: no such axis or label, or a point that is not leave-one-source-out.

    Example::

        >>> table = baseline_table(experiment, store, "method", "baseline")  # doctest: +SKIP
        >>> print(markdown_baseline_table(table))                            # doctest: +SKIP
    """
    from covidcxr.errors import CovidCXRError
    from covidcxr.rundir import RunDir

    if method_axis not in experiment.axes:
        raise CovidCXRError(f"--baseline {method_axis}={baseline}: the grid has no axis {method_axis!r}; its axes: {experiment.axes}")
    points = experiment.points()
    if baseline not in {p.labels[method_axis] for p in points}:
        raise CovidCXRError(f"--baseline {method_axis}={baseline}: no point has {method_axis}={baseline!r}; labels: {sorted({p.labels[method_axis] for p in points})}")
    others = [a for a in experiment.axes if a != method_axis]
    runs = store.find_runs(experiment).set_index("key")
    done = {p.key: int(runs.loc[p.key, "id"]) for p in points if p.key in runs.index and runs.loc[p.key, "status"] == "done"}
    metrics = store.metrics_frame(done.values())
    predictions = store.predictions_frame(done.values())
    column_of = {p.key: "/".join(p.labels[a] for a in others) or "all" for p in points}
    base_key = {column_of[p.key]: p.key for p in points if p.labels[method_axis] == baseline}
    rows = []
    for point in points:
        source = _heldout_source(point)
        row: dict[str, Any] = {"column": column_of[point.key], method_axis: point.labels[method_axis], "heldout_source": source,
                               "status": runs.loc[point.key, "status"] if point.key in runs.index and isinstance(runs.loc[point.key, "status"], str) else "pending",
                               "verdict": (RunDir(point.run_dir).read_audit() or {}).get("verdict"), "run_dir": str(point.run_dir)}
        run_id = done.get(point.key)
        if run_id is not None:
            cell = metrics[(metrics["run_id"] == run_id) & (metrics["test_source"] == source)]
            if len(cell):
                row.update({k: cell.iloc[0][k] for k in ("n_images", "n_patients", "n_positive", "n_negative", "auc", "auc_low", "auc_high")})
            base_id = done.get(base_key.get(column_of[point.key], ""))
            if base_id is not None and base_id != run_id:
                row.update(_pair(predictions, run_id, base_id, source) or {})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["column", method_axis, "heldout_source", "status", "n_images", "n_patients", "n_positive", "n_negative",
                                        "auc", "auc_low", "auc_high", "delta", "delta_low", "delta_high", "delta_p", "n_paired", "verdict", "run_dir"])
    return BaselineTable(experiment=experiment.label, method_axis=method_axis, baseline=baseline, columns=list(dict.fromkeys(frame["column"])), rows=frame)


def _signed(value: Any) -> str:
    return "-" if not _defined(value) else f"{value:+.2f}"


def _p_text(value: Any) -> str:
    """``=0.21`` or ``<0.001`` (to follow a ``p``)."""
    text = fmt_p(value)
    return text if text.startswith("<") else f"={text}"


def baseline_cell(row: dict[str, Any] | None, baseline: bool) -> str:
    """``AUC [CI]``, then ``Δ +0.03 [-0.02, +0.08] p=0.21`` (not for the baseline), then the audit verdict."""
    if row is None:
        return ""
    if row.get("status") != "done":
        return str(row.get("status"))
    auc = f"{fmt_number(row.get('auc'))} [{fmt_number(row.get('auc_low'))}, {fmt_number(row.get('auc_high'))}]" if _defined(row.get("auc")) else f"- ({_one_class(row)})"
    parts = [auc]
    if not baseline:
        parts.append(f"Δ {_signed(row.get('delta'))} [{_signed(row.get('delta_low'))}, {_signed(row.get('delta_high'))}] p{_p_text(row.get('delta_p'))}" if _defined(row.get("delta")) else "Δ -")
    verdict = row.get("verdict")
    parts.append(f"audit: {verdict if isinstance(verdict, str) else 'not audited'}")
    return " · ".join(parts)


def baseline_header(table: BaselineTable, column: str) -> str:
    """``nih held out (n=500 images / 362 patients, 250+/250-)``; n is given per cell when the methods' test sets differ."""
    part = table.rows[(table.rows["column"] == column) & (table.rows["status"] == "done")]
    source = table.rows.loc[table.rows["column"] == column, "heldout_source"].iloc[0]
    counts = part[["n_images", "n_patients", "n_positive", "n_negative"]].drop_duplicates()
    if len(counts) != 1 or not _defined(counts.iloc[0]["n_images"]):
        return f"{source} held out"
    c = counts.iloc[0]
    return f"{source} held out (n={int(c['n_images'])} images / {int(c['n_patients'])} patients, {int(c['n_positive'])}+/{int(c['n_negative'])}-)"


def markdown_baseline_table(table: BaselineTable) -> str:
    """Methods (rows) x held-out source (columns): AUC within it [95 % CI], Δ to the baseline [95 % CI], audit verdict."""
    axis = table.method_axis
    lines = [
        f"**{table.experiment}** — AUC within the held-out source [patient-bootstrap 95% CI] · Δ to `{table.baseline}` on the same images "
        "[paired 95% CI, patients clustered: DeLong/Obuchowski] and p · audit verdict",
        "",
        "| " + " | ".join([axis, *(baseline_header(table, c) for c in table.columns)]) + " |",
        "|" + "---|" * (1 + len(table.columns)),
    ]
    for method in dict.fromkeys(table.rows[axis]):
        cells = []
        for column in table.columns:
            found = table.rows[(table.rows[axis] == method) & (table.rows["column"] == column)]
            cells.append(baseline_cell(found.iloc[0].to_dict() if len(found) else None, method == table.baseline))
        lines.append("| " + " | ".join([str(method), *cells]) + " |")
    return "\n".join(lines) + "\n"
