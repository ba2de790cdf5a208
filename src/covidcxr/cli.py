"""The ``covidcxr`` command line (Typer + rich). Thin: every verb calls library functions.

Bad input ends with one red line naming the file, row or field and what was expected, and
exit code 2 — never a library traceback.
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

from covidcxr import MEDICAL_USE_BANNER, __version__
from covidcxr.errors import CovidCXRError

app = typer.Typer(
    name="covidcxr",
    help=f"Chest X-ray COVID-19/pneumonia classifiers, audited for shortcut learning. {MEDICAL_USE_BANNER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Collections: summarize, convert, split, synthesize phantoms.", no_args_is_help=True)
app.add_typer(data_app, name="data")
from covidcxr.cli_segment import segment_app  # noqa: E402

app.add_typer(segment_app, name="segment")

console = Console()
err_console = Console(stderr=True)


def _print_json(payload: Any) -> None:
    # Plain stdout, no rich markup, so the output pipes into jq or json.loads.
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        console.print(f"covidcxr {__version__}")
        raise typer.Exit()


# ---------------------------------------------------------------- data


@data_app.command("sources")
def data_sources() -> None:
    """List the source adapters, the layout each expects, and its citation."""
    from covidcxr.data.sources import SOURCES

    table = Table("name", "layout", "citation", title="source adapters (detection order)")
    for name, cls in SOURCES.items():
        table.add_row(name, cls.description, cls.citation)
    console.print(table)


def _print_summary(summary: dict[str, Any]) -> None:
    from covidcxr.data.summary import summary_frame

    frame = summary_frame(summary)
    table = Table(title=f"{summary['root']} ({summary['adapter']})")
    table.add_column("source")
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for source, row in frame.iterrows():
        style = "bold" if source == "total" else None
        table.add_row(str(source), *(str(v) for v in row.tolist()), style=style)
    console.print(table)
    console.print(f"views: {summary['views']}   sex: {summary['sex']}   age: {summary['age']}")
    if summary.get("patient_origin"):
        origins = ", ".join(f"{n} from {origin}" for origin, n in summary["patient_origin"].items() if origin != "none")
        console.print(f"patient ids (kept as salted hashes): {origins or 'none given'}")
        if summary["images_without_patient_id"]:
            console.print(
                f"[yellow]{summary['images_without_patient_id']} image(s) without a patient id: each is its own patient, "
                "so images of one patient may fall on both sides of a split; give patients.csv or DICOM Patient IDs"
            )
    console.print(
        f"duplicate groups: {summary['duplicate_groups']} ({summary['duplicate_images']} images; "
        f"{summary['duplicate_groups_across_sources']} across sources; {summary['duplicate_groups_listed']} listed in the manifest)"
    )
    if summary.get("label_conflicts"):
        console.print(f"[red]{len(summary['label_conflicts'])} file(s) copied under different labels (split and train refuse them):")
        for line in summary["label_conflicts"]:
            console.print(f"  [red]{escape(line)}", highlight=False)
    if summary["unreadable"]:
        console.print(f"[red]{len(summary['unreadable'])} unreadable or rejected item(s):")
        for item in summary["unreadable"]:
            console.print(f"  [red]{item['path']}[/red]: {item['reason']}")
    else:
        console.print("unreadable: none")


_CACHE_HELP = "Reuse fingerprints cached in $COVIDCXR_CACHE_DIR (default .cache/covidcxr/fingerprints.sqlite)."


def _fingerprint_cache(enabled: bool) -> Path | None:
    from covidcxr.data.dedup import default_fingerprint_cache

    return default_fingerprint_cache() if enabled else None


@data_app.command("summarize")
def data_summarize(
    directory: Annotated[Path, typer.Argument(help="A collection (manifest.csv) or any adapter's public layout.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    source: Annotated[Optional[str], typer.Option(help="Adapter name (see `covidcxr data sources`); detected if omitted.")] = None,
    check_images: Annotated[bool, typer.Option("--check-images/--no-check-images", help="Decode every image: find unreadable files and near-duplicates.")] = True,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=_CACHE_HELP)] = True,
) -> None:
    """Counts by source × label, patients, views, masks, duplicate groups, unreadable files."""
    from covidcxr.data.summary import summarize

    summary = summarize(
        directory, source=source, check_images=check_images, workers=workers, show_progress=not json_output, cache=_fingerprint_cache(cache)
    )
    if json_output:
        _print_json(summary)
    else:
        _print_summary(summary)


@data_app.command("manifest")
def data_manifest(
    directory: Annotated[Path, typer.Argument(help="A collection or public layout to convert.")],
    out: Annotated[Path, typer.Option(help="Where to write the canonical manifest (.csv or .parquet).")],
    source: Annotated[Optional[str], typer.Option(help="Adapter name; detected if omitted.")] = None,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Fingerprint images and fill dup_group.")] = True,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=_CACHE_HELP)] = True,
) -> None:
    """Read any supported layout into covidcxr's canonical manifest, rejected items listed."""
    from covidcxr.data.dedup import find_near_duplicates
    from covidcxr.data.manifest import write_manifest
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import check_label_conflicts

    from covidcxr.data.dedup import FingerprintCache
    from covidcxr.data.sources._common import sha1_cache

    fingerprints = None if not cache else FingerprintCache(_fingerprint_cache(cache))
    with sha1_cache(fingerprints):
        table = load_source(directory, source)
    manifest, rejected = table.manifest, list(table.rejected)
    if dedup:
        manifest, _, unreadable = find_near_duplicates(manifest, workers=workers, cache=fingerprints)
        rejected.extend(unreadable)
        bad = {r.path for r in unreadable}
        manifest = manifest[~manifest["image"].isin(bad)]
    write_manifest(manifest, out)
    console.print(f"wrote {out}: {len(manifest)} images, {manifest['patient_id'].nunique()} patients")
    for item in rejected:
        console.print(f"  [red]rejected[/red] {item.path}: {item.reason}")
    try:
        check_label_conflicts(manifest)
    except CovidCXRError as error:  # written all the same (it is the collection as it is), but said
        console.print(f"[red]{escape(str(error))}", highlight=False)


@data_app.command("split")
def data_split(
    manifest_path: Annotated[Path, typer.Argument(help="A canonical manifest (.csv/.parquet) or a collection folder.")],
    out: Annotated[Path, typer.Option(help="Where to write the split manifest.")],
    scheme: Annotated[str, typer.Option(help="holdout (train/val/test), kfold, or loso (leave one source out).")] = "holdout",
    test_size: Annotated[float, typer.Option(help="holdout: test fraction (Tartaglione et al.: 0.3).")] = 0.3,
    val_size: Annotated[float, typer.Option(help="Validation fraction of the rest (Tartaglione et al.: 0.2).")] = 0.2,
    folds: Annotated[int, typer.Option(help="kfold: number of folds (Hall et al.: 10).")] = 10,
    test_source: Annotated[Optional[str], typer.Option(help="loso: the source held out as unseen.")] = None,
    stratify: Annotated[str, typer.Option(help="Comma-separated columns kept in proportion.")] = "source,label",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Decode every image and group near-duplicates (exact copies are always grouped by sha1).")] = True,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes for --dedup (default: all cores).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=_CACHE_HELP)] = True,
) -> None:
    """Split patient-disjointly, copies and near-duplicates kept together; leakage and copies with conflicting labels are errors."""
    from covidcxr.data.manifest import read_manifest, write_manifest
    from covidcxr.data.sources import load_source
    from covidcxr.data.splits import group_kfold, leave_one_source_out, link_duplicates, split_train_val_test

    from covidcxr.data.dedup import FingerprintCache
    from covidcxr.data.sources._common import sha1_cache

    fingerprints = FingerprintCache(_fingerprint_cache(cache)) if cache else None
    if manifest_path.is_dir():
        with sha1_cache(fingerprints):
            table = load_source(manifest_path)
        manifest, rejected = table.manifest, list(table.rejected)
    else:
        manifest, rejected = read_manifest(manifest_path), []
    if dedup:
        manifest, unreadable = link_duplicates(manifest, workers=workers, show_progress=True, cache=fingerprints)
        rejected.extend(unreadable)
    for item in rejected:
        console.print(f"  [red]left out[/red] {escape(item.path)}: {escape(item.reason)}", highlight=False)
    columns = tuple(c.strip() for c in stratify.split(",") if c.strip())
    if scheme == "holdout":
        result = split_train_val_test(manifest, test_size=test_size, val_size=val_size, stratify=columns, seed=seed)
        counts = result["split"].value_counts().to_dict()
    elif scheme == "kfold":
        result = group_kfold(manifest, n_splits=folds, stratify=columns, seed=seed)
        counts = result["fold"].value_counts().sort_index().to_dict()
    elif scheme == "loso":
        if not test_source:
            raise CovidCXRError("--scheme loso needs --test-source NAME")
        result, removed = leave_one_source_out(manifest, test_source, val_size=val_size, stratify=columns, seed=seed)
        counts = result["split"].value_counts().to_dict()
        for item in removed:
            console.print(f"  [yellow]removed[/yellow] {item.path}: {item.reason}")
    else:
        raise CovidCXRError(f"--scheme must be holdout, kfold or loso, not {scheme!r}")
    write_manifest(result, out)
    linked = "patient, exact copy (sha1) or near-duplicate group" if dedup else "patient, exact copy (sha1) or listed duplicate group"
    console.print(f"wrote {out}: {counts}; checked: no {linked} crosses a boundary")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the phantom collection into.")],
    images: Annotated[int, typer.Option(help="Total number of images, spread over the sites.")] = 300,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    shortcut: Annotated[str, typer.Option(help="Planted shortcut: none, marker (corner text), window (intensity) or view (AP films on the label).")] = "none",
    shortcut_site: Annotated[Optional[str], typer.Option(help="Site carrying the shortcut (default: the first site).")] = None,
    shortcut_label: Annotated[str, typer.Option(help="Label the shortcut correlates with.")] = "covid",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes identical files.")] = 0,
) -> None:
    """Write synthetic CXR phantoms with exact lung masks from several sites (a collection folder)."""
    from covidcxr.data.summary import summarize
    from covidcxr.data.synth import DEFAULT_SITES, ShortcutSpec, synthesize
    from covidcxr.parallel import make_progress

    spec = None
    if shortcut != "none":
        if shortcut not in ("marker", "window", "view"):
            raise CovidCXRError(f"--shortcut must be none, marker, window or view, not {shortcut!r}")
        spec = ShortcutSpec(kind=shortcut, site=shortcut_site or DEFAULT_SITES[0].name, label=shortcut_label)
    with make_progress() as progress:
        task = progress.add_task("synthesizing phantoms", total=images)
        synthesize(out, n_images=images, size=size, shortcut=spec, seed=seed, progress=lambda n=1: progress.advance(task, n))
    _print_summary(summarize(out, check_images=False, show_progress=False))


# ---------------------------------------------------------------- preprocess

from covidcxr.cli_preprocess import preprocess  # noqa: E402  (a thin module: imports nothing heavy)

app.command("preprocess")(preprocess)

from covidcxr.cli_train import train  # noqa: E402  (thin: imports torch/lightning only when run)

app.command("train")(train)

from covidcxr.cli_evaluate import evaluate  # noqa: E402  (thin: imports the metrics only when run)

app.command("evaluate")(evaluate)

from covidcxr.cli_experiment import experiment_app  # noqa: E402  (thin: imports the grid runner only when run)

app.add_typer(experiment_app, name="experiment")

from covidcxr.cli_serve import export, predict, serve  # noqa: E402  (thin: imports torch/FastAPI only when run)

app.command("predict")(predict)
app.command("serve")(serve)
app.command("export")(export)

from covidcxr.cli_audit import audit  # noqa: E402  (thin: imports torch only when run)

app.command("audit")(audit)

from covidcxr.cli_report import report  # noqa: E402  (thin: imports matplotlib/jinja2 only when run)

app.command("report")(report)

from covidcxr.cli_adapt import adapt  # noqa: E402  (thin: imports torch only when run)

app.command("adapt")(adapt)

from covidcxr.cli_recipe import recipe_app  # noqa: E402  (thin: imports pydantic models only when run)

app.add_typer(recipe_app, name="recipe")


# ---------------------------------------------------------------- demo


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo"),
    data: Annotated[Optional[Path], typer.Option(help="A real collection (e.g. ../shared/data/cxr) instead of the phantoms.")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Patient-bootstrap resamples behind the bootstrap CIs (ROC bands, within-source and source-only AUCs, calibration); per-source metric CIs are analytic.")] = 1000,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """The whole journey: data -> lungs -> preprocess -> pretrain -> fine-tune -> seen/unseen test -> audit -> report.

    On phantoms from three sites with a text marker planted on COVID images of site_a
    (recipes/demo_pretrain.yaml, recipes/demo.yaml), or with --data on a real collection
    (recipes/demo_real*.yaml). Writes OUT/report.html. See covidcxr.demo.
    """
    from covidcxr.demo import run_demo

    console.print(f"[bold yellow]{MEDICAL_USE_BANNER}")
    if data is not None and not data.is_dir():
        raise CovidCXRError(f"--data {data} is not a folder")
    result = run_demo(out, data=data, progress=progress, n_boot=n_boot, say=lambda line: console.print(escape(line), highlight=False))
    table = Table("source", "seen", "images", "patients", "AUC [95% CI]", title=f"{result.run.name}: test AUC per source")
    seen = set(result.evaluation["training_sources"])
    for source, metrics in result.evaluation["per_source"].items():
        auc = (metrics or {}).get("auc")
        if auc:
            text = f"{auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
        else:  # one class only: the AUC is undefined, the share called correctly is not
            name = "specificity" if metrics.get("n_positive", 0) == 0 else "sensitivity"
            part = metrics.get(name) or {}
            text = f"- (one class; {name} {part['estimate']:.3f})" if part.get("estimate") is not None else "-"
        table.add_row(source, "seen" if source in seen else "UNSEEN", str(metrics["n_images"]), str(metrics["n_patients"]), text)
    console.print(table)
    style = {"shortcut": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}
    console.print(f"[bold]audit verdict: [{style[result.audit['verdict']]}]{result.audit['verdict'].upper()}[/]")
    for finding in result.audit["findings"]:
        if finding["severity"] in ("shortcut", "warning"):
            console.print(f"[{style[finding['severity']]}]{finding['severity'].upper():>8}[/]  {escape(finding['text'])}", highlight=False)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    console.print(f"[bold]report:[/bold] {result.report} (and {result.results_json}); {timing}")


def main() -> None:
    """Entry point: run the Typer app, turning covidcxr's own errors into one clear line."""
    try:
        app()
    except CovidCXRError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
