"""``covidcxr evaluate``: per-source and seen-vs-unseen metrics of trained runs.

Registered on the main app in `covidcxr.cli` (``app.command("evaluate")(evaluate)``). Thin:
the work is in `covidcxr.evaluate.cross_source` (a run's own test split),
`covidcxr.evaluate.external` (``--data DIR``: the run scored on another collection) and
`covidcxr.evaluate.foreign` (``--model MODEL.yaml --data DIR``: an ONNX or TorchScript model).
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


def _print_external(report: dict[str, Any]) -> None:
    seen = set(report["training_sources"])
    trained = ", ".join(report["training_sources"]) or "unknown sources"
    table = Table(title=escape(f"{report.get('run') or report['model_name']} on {report['data']} — threshold {report['threshold']:g}, trained on {trained}"))
    for column in ("source", "images", "patients", "AUC [95% CI]", "sensitivity", "specificity", "bal. accuracy", "DOR", "note"):
        table.add_column(column, justify="left" if column in ("source", "note") else "right")
    for source, m in report["per_source"].items():
        table.add_row(*_metric_row(f"{source} ({'seen' if source in seen else 'unseen'})", m))
    table.add_section()
    su = report["seen_unseen"]
    table.add_row(*_metric_row("seen sources", su["seen"]))
    table.add_row(*_metric_row("unseen sources", su["unseen"]))
    table.add_row(*_metric_row("all scored", report["overall"]), style="bold")
    console.print(table)
    excluded = report["excluded"]
    console.print(escape(f"excluded {excluded['n']} of {report['n_candidates']} images (listed in {excluded['file']}):"), highlight=False)
    for reason, count in excluded["by_reason"].items():
        console.print(escape(f"  {count:>6}  {reason}"), highlight=False)
    if report.get("training_data") and not report["training_data"]["known"]:
        console.print(escape(f"note: {report['training_data']['note']}"), style="yellow", highlight=False)
    where = Path(report["out"]) if report.get("out") else Path(report["run_dir"]) / "external" / report["name"]
    console.print(escape(f"refused by the preprocessing: {report['rejected']['n']} ({report['rejected']['file']}); "
                         f"written to {where}/ ({report['seconds']:.0f} s)"), highlight=False)


def _print_matrix(matrix: Any) -> None:
    table = Table(title=escape("train × test AUC (rows: run [training sources]; columns: test source)"))
    table.add_column("training")
    for column in matrix.columns:
        table.add_column(str(column), justify="right")
    for name, row in matrix.iterrows():
        table.add_row(escape(str(name)), *("-" if v != v else f"{v:.3f}" for v in row.tolist()))
    console.print(table)


def evaluate(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="One or more run directories written by `covidcxr train` (omit with --model).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables (one object for one run; {runs, matrix} for several).")] = False,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold: probability >= threshold is positive (default: each run's operating point, RUN/operating_point.json; 0.5 for a run that stored none).")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-level bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    data: Annotated[Optional[Path], typer.Option("--data", help="Score the run on this collection (any layout an adapter reads) instead of its own test split; images linked to its training/validation data are excluded.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="With --data: the source adapter (default: detected; see `covidcxr data sources`).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="With --data: the folder RUN/external/NAME/ (default: the collection folder's name).")] = None,
    chunk: Annotated[int, typer.Option("--chunk", help="With --data: images scored and flushed per chunk (a rerun skips finished images).")] = 512,
    model: Annotated[Optional[str], typer.Option("--model", help="A shipped model by name (covid, pneumonia; evaluated in its working copy runs/shipped-NAME/), or a MODEL.yaml describing an ONNX or TorchScript classifier (see README 'Foreign models'; needs --data).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="With --model: the results folder (default ./covidcxr-external/<model name>/).")] = None,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="With --model: the preprocessing cache.")] = Path(".cache/covidcxr"),
    workers: Annotated[Optional[int], typer.Option("--workers", help="With --model: preprocessing processes (default: every core).")] = None,
) -> None:
    """Per-source metrics with patient-level CIs, seen vs unseen sources (DeLong), train × test AUC matrix.

    Writes RUN/evaluation.json for each run; with --data, RUN/external/NAME/ (predictions.parquet,
    evaluation.json, excluded.csv, rejected.csv); with --model MODEL.yaml --data DIR (an ONNX or
    TorchScript classifier), the same files under --out.
    """
    from covidcxr.errors import CovidCXRError
    from covidcxr.evaluate.cross_source import cross_source_matrix, cross_source_table, evaluate_run

    if n_boot < 1:
        raise CovidCXRError(f"--n-boot: expected a positive integer, got {n_boot}")
    from covidcxr.zoo import is_shipped, working_copy

    runs = list(runs or [])
    if model is not None and is_shipped(model):  # a shipped name -> its run (covidcxr.zoo)
        runs.append(working_copy(model))
    elif model is not None:  # a foreign model's MODEL.yaml
        _evaluate_foreign(runs, Path(model), data, source, name, out, cache_dir, workers, n_boot, seed, chunk, json_output, threshold)
        return
    if out is not None:
        raise CovidCXRError("--out goes with --model MODEL.yaml (a foreign model's results folder); a run's results go to RUN/external/NAME/")
    if not runs:
        raise CovidCXRError("covidcxr evaluate: give a run directory, --model NAME (covid, pneumonia) or --model MODEL.yaml --data DIR")
    if data is not None:
        _evaluate_external(runs, data, source, name, n_boot, seed, chunk, json_output, threshold)
        return
    if source is not None or name is not None:
        raise CovidCXRError("--source and --name go with --data (an evaluation on another collection)")
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


def _evaluate_external(runs: list[Path], data: Path, source: Optional[str], name: Optional[str], n_boot: int, seed: int, chunk: int, json_output: bool, threshold: Optional[float]) -> None:
    from covidcxr.errors import CovidCXRError
    from covidcxr.evaluate.external import evaluate_external

    if len(runs) != 1:
        raise CovidCXRError(f"--data scores one run; got {len(runs)}")
    if threshold is not None:
        raise CovidCXRError("--threshold: an evaluation on another collection uses the run's own operating point (chosen on validation)")
    if chunk < 1:
        raise CovidCXRError(f"--chunk: expected a positive integer, got {chunk}")

    def say(line: str) -> None:
        if not json_output:
            console.print(escape(line), style="dim", highlight=False)

    report = evaluate_external(runs[0], data, name=name, adapter=source, n_boot=n_boot, seed=seed, chunk=chunk, say=say)
    if json_output:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _print_external(report)


def _evaluate_foreign(runs: list[Path], model: Path, data: Optional[Path], source: Optional[str], name: Optional[str], out: Optional[Path], cache_dir: Path,
                      workers: Optional[int], n_boot: int, seed: int, chunk: int, json_output: bool, threshold: Optional[float]) -> None:
    """``evaluate --model MODEL.yaml --data DIR`` (`covidcxr.evaluate.foreign`)."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.evaluate.foreign import evaluate_foreign

    if runs:
        raise CovidCXRError("give either run directories or --model MODEL.yaml, not both")
    if data is None:
        raise CovidCXRError("--model needs --data DIR: the labelled collection to score it on")
    if name is not None:
        raise CovidCXRError("--name goes with a run; a foreign model's results go to --out (default ./covidcxr-external/<model name>/)")
    if threshold is not None:
        raise CovidCXRError("--threshold: a foreign model's threshold is its MODEL.yaml's output.threshold")
    if chunk < 1 or (workers is not None and workers < 1):
        raise CovidCXRError(f"--chunk and --workers: expected positive integers, got {chunk} and {workers}")

    def say(line: str) -> None:
        if not json_output:
            console.print(escape(line), style="dim", highlight=False)

    report = evaluate_foreign(model, data, out=out, adapter=source, n_boot=n_boot, seed=seed, chunk=chunk, cache_dir=cache_dir, workers=workers, say=say)
    if json_output:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _print_external(report)
