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

_STYLE = {"no_skill": "bold magenta", "shortcut": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def _ci(part: dict | None) -> str:
    if not part or part.get("estimate") is None:
        return "—"
    return f"{part['estimate']:.2f} [{part['low']:.2f}, {part['high']:.2f}]"


def _print_subgroups(confounders: dict) -> None:
    """AUC, sensitivity and specificity per view / sex / age band of the training sources' test images."""
    groups = confounders.get("subgroups") or {}
    if not groups:
        return
    console.print("\n[bold]Subgroups[/bold] (test images of the training sources; AUC, sensitivity, specificity with 95% CIs)")
    for attribute, parts in groups.items():
        for group, m in parts.items():
            if not m:
                continue
            console.print(
                escape(f"  {attribute:>8} {group:<10} n={m['n_images']:>4} images / {m['n_patients']:>4} patients   AUC {_ci(m.get('auc'))}   "
                       f"sens {_ci(m.get('sensitivity'))}   spec {_ci(m.get('specificity'))}"),
                highlight=False,
            )


def audit(
    run: Annotated[Path, typer.Argument(help="A run directory written by `covidcxr train` (k-fold: one fold-k).")],
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind the bootstrap CIs (probe, within-source AUC); per-source metric CIs are analytic.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap, the probe's folds and t-SNE.")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", help="Cap on the val + test images audited (whole patients sampled).")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print audit.json to stdout instead of the findings.")] = False,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 when the verdict reaches this severity: shortcut (or no_skill), warning, or never.")] = "never",
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
        _print_subgroups(report.get("confounders") or {})
        console.print(escape(f"written to {Path(report['run_dir']) / AUDIT_DIR / AUDIT_FILE} ({report['seconds']:.0f} s)"), style="dim", highlight=False)
    severities = set(f["severity"] for f in report["findings"])
    if (fail_on == "shortcut" and {"no_skill", "shortcut"} & severities) or (fail_on == "warning" and {"no_skill", "shortcut", "warning"} & severities):
        raise typer.Exit(1)
