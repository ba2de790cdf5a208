"""``covidcxr evaluate``: per-source and seen-vs-unseen metrics of trained runs.

Registered on the main app in `covidcxr.cli` (``app.command("evaluate")(evaluate)``). Thin:
the work is in `covidcxr.evaluate.cross_source`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _est(metric: Any) -> str:
    return "-" if not metric else _num(metric.get("estimate"))


def _auc_ci(metric: Any) -> str:
    if not metric or metric.get("estimate") is None:
        return "-"
    return f"{metric['estimate']:.3f} [{_num(metric.get('low'))}, {_num(metric.get('high'))}]"


def _metric_row(name: str, m: Any) -> list[str]:
    if not m:
        return [name, "0", "0", "-", "-", "-", "-", "-", ""]
    return [
        escape(name), str(m["n_images"]), str(m["n_patients"]), _auc_ci(m.get("auc")), _est(m.get("sensitivity")),
        _est(m.get("specificity")), _est(m.get("balanced_accuracy")), _est(m.get("dor")), escape(m.get("note") or ""),
    ]


def _print_run(report: dict[str, Any]) -> None:
    table = Table(title=escape(f"{report['run']} — test split, threshold {report['threshold']:g}, trained on {', '.join(report['training_sources'])}"))
    for column in ("source", "images", "patients", "AUC [95% CI]", "sensitivity", "specificity", "bal. accuracy", "DOR", "note"):
        table.add_column(column, justify="left" if column in ("source", "note") else "right")
    seen = set(report["training_sources"])
    for source, m in report["per_source"].items():
        table.add_row(*_metric_row(f"{source} ({'seen' if source in seen else 'unseen'})", m))
    table.add_section()
    su = report["seen_unseen"]
    table.add_row(*_metric_row("seen sources", su["seen"]))
    table.add_row(*_metric_row("unseen sources", su["unseen"]))
    table.add_row(*_metric_row("all test", report["overall"]), style="bold")
    point = report.get("operating_point") or {}
    if point.get("describe"):
        table.caption = escape("operating point: " + point["describe"] + ("" if point.get("used", True) else f" — not used: --threshold {report['threshold']:g} was given"))
    console.print(table)
    gap = su["gap"]
    if gap.get("p_value") is None:
        console.print(escape(f"seen vs unseen AUC gap: undefined ({gap.get('note')})"), highlight=False)
    else:
        console.print(
            f"seen vs unseen AUC gap: {gap['auc_diff']:+.3f} (seen {gap['auc_seen']:.3f}, unseen {gap['auc_unseen']:.3f}); "
            f"DeLong z = {gap['z']:.2f}, p = {gap['p_value']:.3g}",
            highlight=False,
        )
    within, baseline = report.get("within_source"), report.get("source_only")
    if within:
        console.print(escape(f"within-source AUC (pairs from the same source only: {', '.join(within['sources'])}): {_auc_ci(within)}"), highlight=False)
    if baseline:
        console.print(escape(f"source-only baseline (each image scored by its source's training positive rate): AUC {_auc_ci(baseline)}"), highlight=False)
    console.print(escape(
        "95% CIs count a patient's images as correlated: analytic intervals on the effective sample size "
        f"(Wilson / Newcombe, see README 'Intervals'); within-source and source-only AUCs: patient bootstrap "
        f"({report['n_boot']} resamples); written to {Path(report['run_dir']) / 'evaluation.json'}"), highlight=False)


def _print_matrix(matrix: Any) -> None:
    table = Table(title=escape("train × test AUC (rows: run [training sources]; columns: test source)"))
    table.add_column("training")
    for column in matrix.columns:
        table.add_column(str(column), justify="right")
    for name, row in matrix.iterrows():
        table.add_row(escape(str(name)), *("-" if v != v else f"{v:.3f}" for v in row.tolist()))
    console.print(table)


def evaluate(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories written by `covidcxr train`.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables (one object for one run; {runs, matrix} for several).")] = False,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold: probability >= threshold is positive (default: each run's operating point, RUN/operating_point.json; 0.5 for a run that stored none).")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-level bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Per-source metrics with patient-level CIs, seen vs unseen sources (DeLong), train × test AUC matrix.

    Writes RUN/evaluation.json for each run.
    """
    from covidcxr.errors import CovidCXRError
    from covidcxr.evaluate.cross_source import cross_source_matrix, cross_source_table, evaluate_run

    if n_boot < 1:
        raise CovidCXRError(f"--n-boot: expected a positive integer, got {n_boot}")
    reports = [evaluate_run(run, threshold=threshold, n_boot=n_boot, seed=seed) for run in runs]
    if json_output:
        if len(reports) == 1:
            payload: Any = reports[0]
        else:
            matrix = cross_source_matrix(reports)
            long = cross_source_table(reports)
            payload = {
                "runs": reports,
                "matrix": {str(r): {str(c): (None if v != v else float(v)) for c, v in row.items()} for r, row in matrix.iterrows()},
                "table": json.loads(long.to_json(orient="records")),
            }
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        return
    for report in reports:
        _print_run(report)
    if len(reports) > 1:
        _print_matrix(cross_source_matrix(reports))
