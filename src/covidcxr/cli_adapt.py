"""``covidcxr adapt RUN --data DIR [--labels N] [--out NEW_RUN]``: adapt a trained run to a new site.

Registered on the main app in `covidcxr.cli`. Thin: the work is in `covidcxr.adapt`
(AdaBN without labels, fine-tuning on N labelled images with them); this prints the
held-out target AUC before and after, with its interval and its n.
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


def _auc(metrics: Any) -> str:
    auc = (metrics or {}).get("auc") or {}
    if auc.get("estimate") is None:
        return "- (one class)"
    return f"{auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"


def adapt(
    data: Annotated[Path, typer.Option("--data", help="The new site's images: a collection folder (any layout covidcxr reads).")],
    run: Annotated[Optional[Path], typer.Argument(help="The trained run directory to adapt (it is not modified); or --model NAME.")] = None,
    labels: Annotated[Optional[int], typer.Option("--labels", help="Fine-tune on N labelled target images (Ben Ahmed et al. 2021); without it, AdaBN uses no label.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="The new run directory (default: beside RUN, named after the method and the source).")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="The target source inside --data (needed when it holds several).")] = None,
    fraction: Annotated[float, typer.Option("--fraction", help="AdaBN: share of target patients whose images re-estimate the statistics; the rest are the test images.")] = 0.5,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Fine-tuning: override a recipe field, e.g. --set train.epochs=20 (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient draws and the bootstrap.")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind the CIs.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print adaptation.json instead of the table.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    model: Annotated[Optional[str], typer.Option("--model", help="Adapt a shipped model (covid, pneumonia): its working copy runs/shipped-NAME/ is the parent, the new run goes beside it.")] = None,
) -> None:
    """Adapt a run to a new site: AdaBN (no labels) or fine-tuning on N labelled images; writes a new run.

    The new run (config.yaml, checkpoints/, manifest.parquet, predictions.parquet, metrics.json, adaptation.json
    naming its parent_run) works with evaluate, audit, predict and serve like any run; its test images are target
    images it never saw.
    """
    from covidcxr.adapt import adapt_run
    from covidcxr.errors import CovidCXRError

    from covidcxr.zoo import select

    if set_ and labels is None:
        raise CovidCXRError("--set: AdaBN trains nothing; overrides apply to fine-tuning (--labels N)")
    run, chosen = select(run, model, writable=True, default=False)  # a shipped model is never written to
    if chosen is not None and not as_json:
        console.print(escape(chosen), style="bold", highlight=False)

    def say(line: str) -> None:
        if not as_json:
            console.print(escape(line), style="dim", highlight=False)

    result = adapt_run(run, data, out=out, labels=labels, source=source, fraction=fraction, overrides=list(set_ or []), seed=seed, n_boot=n_boot, progress=progress and not as_json, say=say)
    summary = result.summary
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    target = summary["target"]["source"]
    images = summary["images"]
    table = Table("model", "test images", "test patients", "AUC [95% CI]", "accuracy", title=escape(f"{result.method} on {target}: held-out target images"))
    for name, key in (("before (parent)", "before"), ("after (adapted)", "after")):
        m = summary[key].get(target) or {}
        accuracy = (m.get("accuracy") or {}).get("estimate")
        table.add_row(name, str(m.get("n_images", 0)), str(images["test_patients"]), _auc(m), "-" if accuracy is None else f"{accuracy:.3f}")
    console.print(table)
    delong = summary["adaptation"].get("delong") or {}
    if delong.get("p_value") is not None:
        console.print(f"DeLong test of the AUC change: p = {delong['p_value']:.3g}", highlight=False)
    console.print(
        escape(
            f"adapted run: {result.run_dir} (parent_run: {result.parent}); adapted on {images['adapt']} images "
            f"({images['adapt_patients']} patients), tested on {images['test']} ({images['test_patients']} patients); "
            f"patient-bootstrap CIs ({n_boot} resamples)"
        ),
        highlight=False,
    )
