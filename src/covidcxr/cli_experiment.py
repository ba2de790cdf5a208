"""``covidcxr experiment run|status|table RECIPE``: a recipe's grid of runs, resumable, results in a database.

Registered on the main app in `covidcxr.cli` (``app.add_typer(experiment_app, name="experiment")``).
Thin: the work is in `covidcxr.experiments` (recipe expansion, run store, runner, table).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()

experiment_app = typer.Typer(
    help="Experiment grids: one recipe per seed paper expanded into runs, each tested on every source; results in SQLite (or PostgreSQL).",
    no_args_is_help=True,
)

RecipeArg = Annotated[Path, typer.Argument(help="An experiment recipe (a training recipe with an `experiment:` section), e.g. recipes/tartaglione2020.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="scale=NAME picks a scale; KEY=VALUE overrides every run (train.epochs=3), experiment.* the grid, pretrain.* the stage-1 runs. Repeatable.")]
DbOpt = Annotated[Optional[str], typer.Option("--db", help="Database URL: sqlite:///PATH (default: RUNS_DIR/experiments.sqlite) or postgresql://user@host:port/db for workers on several machines.")]
RunsOpt = Annotated[Optional[Path], typer.Option("--runs-dir", help="Where the experiment's folder goes (default: the recipe's output.runs_dir).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="The image collection for every run and stage-1 run (data.collection; default: the recipe's).")]


def _load(recipe: Path, set_: list[str] | None, runs_dir: Path | None, db: str | None, data: Path | None = None, extra: list[str] | None = None) -> tuple[Any, Any]:
    from covidcxr.experiments.recipe import load_experiment
    from covidcxr.experiments.runner import default_db_url
    from covidcxr.experiments.store import RunStore

    overrides = [*(set_ or []), *(extra or [])]
    if data is not None:
        folder = str(data.expanduser().resolve())
        overrides += [f"data.collection={folder}", f"pretrain.data.collection={folder}"]
    experiment = load_experiment(recipe, overrides, runs_dir=runs_dir)
    store = RunStore(db or default_db_url(experiment))
    return experiment, store


@experiment_app.command("run")
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    db: DbOpt = None,
    runs_dir: RunsOpt = None,
    data: DataOpt = None,
    worker: Annotated[Optional[str], typer.Option(help="This worker's name in the store (default: host:pid).")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Lightning devices per run: N, 'auto' or a list like 0,1 (engine.devices).")] = None,
    num_nodes: Annotated[Optional[int], typer.Option("--num-nodes", help="Machines per run (engine.num_nodes).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Lightning strategy, e.g. ddp (engine.strategy).")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="auto, cpu or gpu (engine.accelerator).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, 32, bf16-mixed or 16-mixed (engine.precision).")] = None,
    max_runs: Annotated[Optional[int], typer.Option("--max-runs", help="Stop after this many runs (default: until none is pending).")] = None,
    stale_after: Annotated[float, typer.Option("--stale-after", help="Seconds without a heartbeat before another worker reclaims a running run.")] = 300.0,
    heartbeat: Annotated[float, typer.Option("--heartbeat", help="Seconds between heartbeats of the run in progress.")] = 30.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for runs blocked on another worker's stage-1 run (else stop).")] = True,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Put failed runs back in the queue first.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars inside each run.")] = False,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Checkpoints each run keeps once done (output.keep): best (the model, no optimizer state), last (only last.ckpt) or all (default: the recipe's).")] = None,
) -> None:
    """Run the grid as one worker: claim a pending run, train it, test it on every source, store the results; repeat.

    Finished runs are skipped, so a rerun only does what is left; after a crash the run in progress resumes from its last.ckpt. Start the same command on several machines with one --db postgresql://... to share the grid.
    """
    from covidcxr.cli_train import _devices_override
    from covidcxr.experiments.runner import run_experiment
    from covidcxr.experiments.store import Worker

    extra = []
    if devices is not None:
        extra.append(_devices_override(devices))
    for key, value in (("engine.num_nodes", num_nodes), ("engine.strategy", strategy), ("engine.accelerator", accelerator), ("engine.precision", precision)):
        if value is not None:
            extra.append(f"{key}={value}")
    if keep is not None:
        if keep not in ("all", "best", "last"):
            raise typer.BadParameter(f"must be all, best or last; got {keep!r}", param_hint="--keep")
        extra += [f"output.keep={keep}", f"pretrain.output.keep={keep}"]
    experiment, store = _load(recipe, set_, runs_dir, db, data, extra)
    report = run_experiment(
        experiment, store, worker=Worker.here(worker), stale_after=stale_after, heartbeat_every=heartbeat, max_runs=max_runs,
        wait=wait, retry_failed=retry_failed, progress=progress, say=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False),
    )
    counts = report.counts
    if not report.ran and not report.failed:
        console.print(f"nothing new to run: {counts['done']}/{report.total} runs done, {counts['failed']} failed, {counts['running']} running elsewhere, {counts['pending']} pending")
    else:
        console.print(
            f"this worker: {len(report.ran)} run(s) done, {len(report.failed)} failed in {report.seconds:.0f} s; grid: {counts['done']}/{report.total} done, "
            f"{counts['failed']} failed, {counts['running']} running, {counts['pending']} pending"
        )
    sets = "".join(f" --set {shlex.quote(s)}" for s in (set_ or [])) + (f" --data {shlex.quote(str(data))}" if data is not None else "")
    console.print(f"table: covidcxr experiment table {shlex.quote(str(recipe))}{sets}", highlight=False, markup=False, soft_wrap=True)
    if counts["failed"]:
        console.print(f"[red]{counts['failed']} run(s) failed[/red]: see `covidcxr experiment status {recipe}`; --retry-failed runs them again")
        raise typer.Exit(1)


@experiment_app.command("status")
def status(
    recipe: RecipeArg,
    set_: SetOpt = None,
    db: DbOpt = None,
    runs_dir: RunsOpt = None,
    data: DataOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """Every run of the grid: status, worker, attempts, time, error; a run whose worker stopped beating shows as stale."""
    experiment, store = _load(recipe, set_, runs_dir, db, data)
    runs = store.find_runs(experiment)
    counts = runs["status"].value_counts().to_dict()
    if json_output:
        keep = ["key", "kind", "status", "worker", "attempts", "seconds", "error", "stale_reason", "heartbeat_age_s", "run_dir"]
        records = [{k: (None if (isinstance(v, float) and v != v) else v) for k, v in row.items()} for row in runs[keep].to_dict("records")]
        sys.stdout.write(json.dumps({"experiment": experiment.label, "store": store.safe_url, "counts": counts, "runs": records}, indent=2, default=str) + "\n")
        return
    table = Table(title=escape(f"{experiment.label}: {len(runs)} runs — " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({store.safe_url})"))
    for column in ("run", "status", "worker", "attempts", "seconds", "error"):
        table.add_column(column, justify="right" if column in ("attempts", "seconds") else "left", overflow="fold")
    colours = {"done": "green", "failed": "red", "running": "yellow", "stale": "magenta"}
    for row in runs.itertuples(index=False):
        seconds = "" if row.seconds is None or row.seconds != row.seconds else f"{row.seconds:.0f}"
        attempts = "" if row.attempts is None or row.attempts != row.attempts else str(int(row.attempts))
        error = "" if not isinstance(row.error, str) else row.error.strip().splitlines()[-1][:160]
        if isinstance(row.stale_reason, str):  # a killed worker: say so instead of "running" (the next worker reclaims it)
            error = row.stale_reason
        colour = colours.get(row.status, "white")
        table.add_row(escape(row.key), f"[{colour}]{row.status}[/{colour}]", escape(str(row.worker or "")) if isinstance(row.worker, str) else "", attempts, seconds, escape(error))
    console.print(table)


@experiment_app.command("table")
def table_command(
    recipe: RecipeArg,
    set_: SetOpt = None,
    db: DbOpt = None,
    runs_dir: RunsOpt = None,
    data: DataOpt = None,
    output_format: Annotated[str, typer.Option("--format", help="rich (terminal), markdown, csv (long form) or json.")] = "rich",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the table to this file instead of the terminal.")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="AXIS=LABEL, e.g. method=baseline: first the leave-one-source-out table, each point's AUC within its held-out source and its DeLong difference to that baseline on the same images, with the audit verdict (csv: that table alone).")] = None,
) -> None:
    """The Table-2-like grid: rows = the axes (pretrain x composition x architecture), columns = test source -> AUC [CI], sens, spec, BA, DOR; then seen vs unseen pooled."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.experiments.table import baseline_table, cell_text, fmt_number, fmt_p, grid_table, markdown_baseline_table, markdown_table, wide_cells
    from covidcxr.io.atomic import atomic_write_text

    if output_format not in ("rich", "markdown", "csv", "json"):
        raise CovidCXRError(f"--format must be rich, markdown, csv or json, not {output_format!r}")
    if baseline is not None and (baseline.count("=") != 1 or not all(baseline.split("="))):
        raise typer.BadParameter(f"AXIS=LABEL, e.g. method=baseline; got {baseline!r}", param_hint="--baseline")
    experiment, store = _load(recipe, set_, runs_dir, db, data)
    versus = baseline_table(experiment, store, *baseline.split("=")) if baseline is not None else None
    result = grid_table(experiment, store)
    if output_format != "rich":
        if output_format == "markdown":
            text = (markdown_baseline_table(versus) + "\n" if versus is not None else "") + markdown_table(result)
        elif output_format == "csv":
            text = versus.rows.to_csv(index=False) if versus is not None else result.cells.to_csv(index=False)
        else:
            text = json.dumps({"experiment": result.experiment, "axes": result.axes, "cells": result.cells.to_dict("records"), "pooled": result.pooled.to_dict("records"),
                               "adaptation": result.adaptation.to_dict("records"), "missing": result.missing,
                               **({"versus_baseline": {"axis": versus.method_axis, "baseline": versus.baseline, "rows": versus.rows.to_dict("records")}} if versus is not None else {})},
                              indent=2, default=str)
        if out is not None:
            atomic_write_text(out, text if text.endswith("\n") else text + "\n")
            console.print(f"wrote {out}")
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    # the table is as wide as it needs to be (a terminal narrower than that wraps lines)
    wide = Console(width=max(console.width, 16 * len(result.axes) + 26 * len(result.sources) + 40))
    if versus is not None:
        _print_baseline_table(versus, wide)
    rich_table = Table(title=escape(f"{result.experiment}: AUC [95% CI] / sensitivity, specificity / balanced accuracy, DOR, n per test source; * and bold = seen in training"), show_lines=True)
    for axis in result.axes:
        rich_table.add_column(axis, no_wrap=True)
    for source in result.sources:
        rich_table.add_column(source, justify="right")
    for _, row in wide_cells(result).iterrows():
        cells = []
        for source in result.sources:
            cell = row[source]
            cell = cell if isinstance(cell, dict) else None  # a point not done yet (pandas may hold it as NaN)
            text = cell_text(cell) if cell is not None else ""
            cells.append(f"[bold]{escape(text)}[/bold]" if cell is not None and cell.get("seen") else escape(text))
        rich_table.add_row(*(escape(str(row[a])) for a in result.axes), *cells)
    wide.print(rich_table)
    summary = Table(title="seen vs unseen sources, pooled: AUC gap (DeLong), accuracy gap (Fisher's exact test)")
    multiclass = [c for c in ("seen_accuracy_3class", "unseen_accuracy_3class", "seen_accuracy_2class", "unseen_accuracy_2class") if c in result.pooled.columns]
    for column in (*result.axes, "seen AUC", "unseen AUC", "gap", "p", "seen spec", "unseen spec", "seen acc", "unseen acc", "p (acc)", *(c.replace("_accuracy_", " acc ") for c in multiclass), "runs"):
        summary.add_column(column, justify="left" if column in result.axes else "right", no_wrap=column in result.axes)
    for _, row in result.pooled.iterrows():
        summary.add_row(
            *(escape(str(row[a])) for a in result.axes), fmt_number(row.get("seen_auc")), fmt_number(row.get("unseen_auc")), fmt_number(row.get("auc_gap")), fmt_p(row.get("auc_gap_p")),
            fmt_number(row.get("seen_specificity")), fmt_number(row.get("unseen_specificity")), fmt_number(row.get("seen_accuracy")), fmt_number(row.get("unseen_accuracy")),
            fmt_p(row.get("accuracy_gap_p")), *(fmt_number(row.get(c)) for c in multiclass), f"{int(row['runs_done'])}/{int(row['runs_total'])}",
        )
    wide.print(summary)
    if len(result.adaptation):
        adaptation = Table(title="local adaptation (Ben Ahmed et al. 2021, Table 4): accuracy on the same test images before -> after")
        for column in (*result.axes, "source", "class", "n", "before", "after", "McNemar p", "AUC before", "AUC after", "DeLong p"):
            adaptation.add_column(column, justify="left" if column in (*result.axes, "source", "class") else "right")
        for _, row in result.adaptation.iterrows():
            adaptation.add_row(
                *(escape(str(row[a])) for a in result.axes), escape(str(row["source"])), str(row["class"]), str(row["n"]), fmt_number(row["before"]), fmt_number(row["after"]),
                fmt_p(row.get("mcnemar_p")), fmt_number(row.get("auc_before")), fmt_number(row.get("auc_after")), fmt_p(row.get("delong_p")),
            )
        wide.print(adaptation)
    if result.missing:
        console.print(f"[yellow]{len(result.missing)} run(s) not done yet[/yellow] (covidcxr experiment status {recipe})")


def _print_baseline_table(versus: Any, wide: Console) -> None:
    """Methods x held-out source: AUC within it, Δ to the baseline (DeLong), audit verdict."""
    from covidcxr.experiments.table import baseline_cell, baseline_header

    axis = versus.method_axis
    table = Table(title=escape(f"{versus.experiment}: AUC within the held-out source [95% CI] / Δ to {versus.baseline} on the same images [paired 95% CI, patients clustered], p / audit verdict"), show_lines=True)
    table.add_column(axis, no_wrap=True)
    for column in versus.columns:
        table.add_column(escape(baseline_header(versus, column)), justify="right")
    for method in dict.fromkeys(versus.rows[axis]):
        cells = []
        for column in versus.columns:
            found = versus.rows[(versus.rows[axis] == method) & (versus.rows["column"] == column)]
            cells.append(escape(baseline_cell(found.iloc[0].to_dict() if len(found) else None, method == versus.baseline).replace(" · ", "\n")))
        table.add_row(escape(str(method)), *cells)
    wide.print(table)


@experiment_app.command("audit")
def audit_command(
    recipe: RecipeArg,
    set_: SetOpt = None,
    db: DbOpt = None,
    runs_dir: RunsOpt = None,
    data: DataOpt = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Cap on the val + test images each audit scores (whole patients sampled).")] = 2000,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind each audit's CIs.")] = 1000,
    again: Annotated[bool, typer.Option("--again", help="Audit points that already have RUN/audit/audit.json too.")] = False,
) -> None:
    """Audit every finished point of the grid (`covidcxr audit RUN` on each), skipping points already audited.

    The verdicts appear in `covidcxr experiment table RECIPE --baseline AXIS=LABEL`. A point whose audit fails is reported and the others go on.
    """
    from covidcxr.audit.run import audit_run
    from covidcxr.errors import CovidCXRError
    from covidcxr.rundir import RunDir

    experiment, store = _load(recipe, set_, runs_dir, db, data)
    runs = store.find_runs(experiment).set_index("key")
    failed = 0
    for point in experiment.points():
        if point.key not in runs.index or runs.loc[point.key, "status"] != "done":
            console.print(f"{point.key}: not done, not audited", highlight=False, markup=False)
            continue
        if not again and RunDir(point.run_dir).read_audit() is not None:
            console.print(f"{point.key}: already audited", highlight=False, markup=False)
            continue
        try:
            result = audit_run(point.run_dir, n_boot=n_boot, max_images=max_images, seed=experiment.base_recipe.seed)
        except CovidCXRError as exc:
            failed += 1
            console.print(f"[red]{escape(point.key)}: audit failed[/red]: {escape(str(exc))}")
            continue
        console.print(f"{point.key}: {result['verdict']} ({result.get('seconds', 0):.0f} s)", highlight=False, markup=False)
    if failed:
        raise typer.Exit(1)
