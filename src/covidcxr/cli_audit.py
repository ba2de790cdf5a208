"""``covidcxr audit RUN``: the shortcut audit of a trained run (`covidcxr.audit.run.audit_run`).

``covidcxr audit RUN --data DIR`` audits the run on another collection, ``covidcxr audit
--predictions PRED.csv --data DIR`` audits someone's scores and ``covidcxr audit --model
MODEL.yaml --data DIR`` audits an ONNX or TorchScript model as a black box
(`covidcxr.audit.external`).

Registered on the main app in `covidcxr.cli`. Thin: prints the findings, most severe
first, each with its number; the exit status is 0 whatever the verdict (an audit that
finds a shortcut has done its job), and ``--fail-on shortcut`` makes it non-zero for CI
gates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

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
    run: Annotated[Optional[Path], typer.Argument(help="A run directory written by `covidcxr train` (k-fold: one fold-k); omit with --predictions.")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind the bootstrap CIs (probe, within-source AUC); per-source metric CIs are analytic.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap, the probe's folds and t-SNE.")] = 0,
    max_images: Annotated[int, typer.Option("--max-images", help="Cap on the val + test images audited (whole patients sampled).")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print audit.json to stdout instead of the findings.")] = False,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 when the verdict reaches this severity: shortcut (or no_skill), warning, or never.")] = "never",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the preprocessing progress bar.")] = True,
    data: Annotated[Optional[Path], typer.Option("--data", help="Audit on this collection (with RUN: the run scored on it, linked images excluded; with --predictions: the labels and metadata of the predicted images).")] = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="A CSV of someone's predictions (columns image as in the collection's manifest, probability[, split]); needs --data.")] = None,
    training_sources: Annotated[Optional[str], typer.Option("--training-sources", help="With --predictions: the model's training sources, comma-separated (default: the sources of the CSV's train/val rows).")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="With --data: the source adapter (default: detected).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="With RUN --data: the folder RUN/external/NAME/ (default: the collection folder's name).")] = None,
    positive_label: Annotated[str, typer.Option("--positive-label", help="With --predictions: the label the probability is of; every other label is negative.")] = "covid",
    threshold: Annotated[float, typer.Option("--threshold", help="With --predictions: the decision threshold.")] = 0.5,
    embedding: Annotated[str, typer.Option("--embedding", help="The embedding map of the run-based audit: tsne, or umap (umap-learn, from covidcxr[tracking]).")] = "tsne",
    model: Annotated[Optional[str], typer.Option("--model", help="A shipped model by name (covid, pneumonia; audited in its working copy runs/shipped-NAME/), or a MODEL.yaml describing an ONNX or TorchScript classifier: the black-box audit on --data DIR.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="With --model: the results folder (default ./covidcxr-external/<model name>/; the audit goes to OUT/audit/).")] = None,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="With --model: the preprocessing cache.")] = Path(".cache/covidcxr"),
    workers: Annotated[Optional[int], typer.Option("--workers", help="With --model: preprocessing processes (default: every core).")] = None,
    saliency_images: Annotated[int, typer.Option("--saliency-images", help="With --model: images given occlusion saliency (drawn at random; each costs one prediction per patch).")] = 200,
) -> None:
    """Audit a run for shortcut learning: source probe, lung ablation, Grad-CAM lung focus, t-SNE.

    Writes RUN/audit/ (audit.json, gallery.png, embedding.png, tables) and RUN/evaluation.json;
    with --model MODEL.yaml --data DIR, the black-box audit of a foreign model under --out.
    """
    from covidcxr.audit.run import AUDIT_DIR, AUDIT_FILE, audit_run
    from covidcxr.errors import CovidCXRError

    if fail_on not in ("shortcut", "warning", "never"):
        raise CovidCXRError(f"--fail-on must be shortcut, warning or never; got {fail_on!r}")

    def say(line: str) -> None:
        if not as_json:
            console.print(escape(line), style="dim", highlight=False)

    from covidcxr.zoo import is_shipped, select

    if model is not None and is_shipped(model):  # a shipped name -> its run (covidcxr.zoo)
        run, _ = select(run, model, writable=True)
        model = None
    if model is not None:  # a foreign model's MODEL.yaml
        report = _audit_foreign(run, Path(model), data, predictions, source, name, out, cache_dir, workers, saliency_images, n_boot, seed, progress and not as_json, say)
    elif out is not None:
        raise CovidCXRError("--out goes with --model MODEL.yaml (a foreign model's results folder)")
    elif predictions is not None or data is not None:
        report = _audit_elsewhere(run, data, predictions, training_sources, source, name, positive_label, threshold, n_boot, seed, progress and not as_json, say)
    elif run is None:
        raise CovidCXRError("covidcxr audit: give a run directory, --model MODEL.yaml --data DIR, or --predictions PRED.csv --data DIR")
    else:
        report = audit_run(run, n_boot=n_boot, seed=seed, max_images=max_images, progress=progress and not as_json, say=say, embedding=embedding)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        what = report.get("run") or report.get("model_name") or report.get("predictions")
        console.print(f"\n[bold]Shortcut audit of {escape(str(what))}[/bold] — {report['n_images']} test images, {report['n_patients']} patients; verdict: [{_STYLE[report['verdict']]}]{report['verdict'].upper()}[/]")
        for finding in report["findings"]:
            console.print(f"[{_STYLE[finding['severity']]}]{finding['severity'].upper():>8}[/]  {escape(finding['text'])}", highlight=False)
        _print_subgroups(report.get("confounders") or {})
        for finding_id, reason in (report.get("not_available") or {}).items():
            console.print(escape(f"  not available: {finding_id} — {reason}"), style="dim", highlight=False)
        if report.get("written_to"):
            console.print(escape(f"written to {report['written_to']} ({report['seconds']:.0f} s)"), style="dim", highlight=False)
        elif report.get("run_dir") and report.get("split") == "test":
            console.print(escape(f"written to {Path(report['run_dir']) / AUDIT_DIR / AUDIT_FILE} ({report['seconds']:.0f} s)"), style="dim", highlight=False)
    severities = set(f["severity"] for f in report["findings"])
    if (fail_on == "shortcut" and {"no_skill", "shortcut"} & severities) or (fail_on == "warning" and {"no_skill", "shortcut", "warning"} & severities):
        raise typer.Exit(1)


def _audit_elsewhere(run: Optional[Path], data: Optional[Path], predictions: Optional[Path], training_sources: Optional[str], source: Optional[str], name: Optional[str], positive_label: str, threshold: float, n_boot: int, seed: int, progress: bool, say) -> dict:
    """``audit RUN --data DIR`` or ``audit --predictions PRED.csv --data DIR`` (`covidcxr.audit.external`)."""
    from covidcxr.audit.external import audit_external, audit_predictions
    from covidcxr.errors import CovidCXRError

    if data is None:
        raise CovidCXRError("--predictions needs --data DIR: the collection whose labels and metadata the images have")
    if predictions is not None:
        if run is not None:
            raise CovidCXRError("give either a run directory or --predictions, not both")
        sources = [s.strip() for s in training_sources.split(",") if s.strip()] if training_sources else None
        out = predictions.parent / f"{predictions.stem}-audit"
        report = audit_predictions(predictions, data, sources, adapter=source, positive_label=positive_label, threshold=threshold, n_boot=n_boot, seed=seed, out=out)
        report["written_to"] = str(out / "audit.json")
        return report
    if run is None:
        raise CovidCXRError("--data without --predictions audits a run: give its directory")
    report = audit_external(run, data, name=name, adapter=source, n_boot=n_boot, seed=seed, progress=progress, say=say)
    report["written_to"] = str(Path(report["run_dir"]) / "external" / report["name"] / "audit" / "audit.json")
    return report


def _audit_foreign(run: Optional[Path], model: Path, data: Optional[Path], predictions: Optional[Path], source: Optional[str], name: Optional[str], out: Optional[Path],
                   cache_dir: Path, workers: Optional[int], saliency_images: int, n_boot: int, seed: int, progress: bool, say) -> dict:
    """``audit --model MODEL.yaml --data DIR`` (`covidcxr.audit.external.audit_foreign`)."""
    from covidcxr.audit.external import audit_foreign
    from covidcxr.errors import CovidCXRError

    if run is not None or predictions is not None:
        raise CovidCXRError("give one of a run directory, --model MODEL.yaml or --predictions PRED.csv")
    if data is None:
        raise CovidCXRError("--model needs --data DIR: the labelled collection to audit it on")
    if name is not None:
        raise CovidCXRError("--name goes with a run; a foreign model's results go to --out (default ./covidcxr-external/<model name>/)")
    if saliency_images < 1 or (workers is not None and workers < 1):
        raise CovidCXRError(f"--saliency-images and --workers: expected positive integers, got {saliency_images} and {workers}")
    report = audit_foreign(model, data, out=out, adapter=source, n_boot=n_boot, seed=seed, cache_dir=cache_dir, workers=workers,
                           max_saliency_images=saliency_images, progress=progress, say=say)
    report["written_to"] = str(Path(report["out"]) / "audit" / "audit.json")
    return report
