"""``covidcxr audit RUN``: the shortcut audit of a trained run (`covidcxr.audit.run.audit_run`).

Registered on the main app in `covidcxr.cli`. Thin: prints the findings, most severe
first, each with its number; the exit status is 0 whatever the verdict (an audit that
finds a shortcut has done its job), and ``--fail-on shortcut`` makes it non-zero for CI
gates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console()

_STYLE = {"shortcut": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def audit(
    run: Annotated[Path, typer.Argument(help="A run directory written by `covidcxr train` (k-fold: one fold-k).")],
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind the bootstrap CIs (probe, within-source AUC); per-source metric CIs are analytic.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap, the probe's folds and t-SNE.")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", help="Cap on the val + test images audited (whole patients sampled).")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print audit.json to stdout instead of the findings.")] = False,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity: shortcut, warning or never.")] = "never",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the preprocessing progress bar.")] = True,
) -> None:
    """Audit a run for shortcut learning: source probe, lung ablation, Grad-CAM lung focus, t-SNE.

    Writes RUN/audit/ (audit.json, gallery.png, embedding.png, tables) and RUN/evaluation.json.
    """
    from covidcxr.audit.run import AUDIT_DIR, AUDIT_FILE, audit_run
    from covidcxr.errors import CovidCXRError

    if fail_on not in ("shortcut", "warning", "never"):
        raise CovidCXRError(f"--fail-on must be shortcut, warning or never; got {fail_on!r}")

    def say(line: str) -> None:
        if not as_json:
            console.print(escape(line), style="dim", highlight=False)

    report = audit_run(run, n_boot=n_boot, seed=seed, max_images=max_images, progress=progress and not as_json, say=say)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        console.print(f"\n[bold]Shortcut audit of {escape(report['run'])}[/bold] — {report['n_images']} test images, {report['n_patients']} patients; verdict: [{_STYLE[report['verdict']]}]{report['verdict'].upper()}[/]")
        for finding in report["findings"]:
            console.print(f"[{_STYLE[finding['severity']]}]{finding['severity'].upper():>8}[/]  {escape(finding['text'])}", highlight=False)
        console.print(escape(f"written to {Path(report['run_dir']) / AUDIT_DIR / AUDIT_FILE} ({report['seconds']:.0f} s)"), style="dim", highlight=False)
    severities = [f["severity"] for f in report["findings"]]
    if (fail_on == "shortcut" and "shortcut" in severities) or (fail_on == "warning" and ({"shortcut", "warning"} & set(severities))):
        raise typer.Exit(1)
