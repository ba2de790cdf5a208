"""``covidcxr report``: one self-contained HTML page and a results.json over trained runs.

Registered on the main app in `covidcxr.cli` (``app.command("report")(report)``). Thin: the
work is in `covidcxr.report` (numbers in ``results.py``, figures in ``figures.py``, the page
in ``html.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()

_LEVEL_STYLE = {"no_skill": "bold red", "shortcut": "bold red", "not_audited": "bold yellow", "warning": "yellow", "ok": "green"}


def report(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories written by `covidcxr train` (audited or not).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="The HTML page to write (default: RUN/report.html for one run, ./report.html for several).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Where results.json goes (default: beside the page).")] = None,
    title: Annotated[Optional[str], typer.Option(help="Page title (default: the run names).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Decision threshold (default: each run's operating point, RUN/operating_point.json; 0.5 for a run that stored none).")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples when the evaluation is computed here.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of that bootstrap.")] = 0,
    reevaluate: Annotated[bool, typer.Option("--reevaluate", help="Recompute the evaluation even when evaluation.json is usable.")] = False,
    figure_files: Annotated[bool, typer.Option("--figure-files/--no-figure-files", help="Also write every figure as SVG and 300-dpi PNG into <page>_figures/ beside the page.")] = True,
) -> None:
    """Write a self-contained HTML report (audit findings first, metrics with CIs per source, ROC curves,
    the train × test AUC matrix, data composition, config) and results.json with every number on it.
    """
    from covidcxr.errors import CovidCXRError
    from covidcxr.report import write_report

    if n_boot < 1:
        raise CovidCXRError(f"--n-boot: expected a positive integer, got {n_boot}")
    from covidcxr.rundir import RunDir

    target = out if out is not None else (RunDir(runs[0]).report if len(runs) == 1 else Path("report.html"))
    paths = write_report(runs, target, json_path=json_path, threshold=threshold, n_boot=n_boot, seed=seed, reevaluate=reevaluate, title=title, figures=figure_files)
    for run in paths.results["runs"]:
        style = _LEVEL_STYLE.get(run["verdict"]["level"], "")
        console.print(f"[{style}]{escape(run['name'])}: {escape(run['verdict']['title'])}[/]", highlight=False, soft_wrap=True)
        if run["audit"]["status"] != "audited":
            console.print(f"  not audited: run [bold]{escape(run['audit']['command'])}[/bold], then report again", highlight=False, soft_wrap=True)
    console.print(escape(f"wrote {paths.html} ({paths.html_bytes / 1e6:.2f} MB) and {paths.json}"), highlight=False, soft_wrap=True)
    if paths.figures is not None:
        console.print(escape(f"figures for a manuscript (SVG + 300-dpi PNG): {paths.figures}/"), highlight=False, soft_wrap=True)
