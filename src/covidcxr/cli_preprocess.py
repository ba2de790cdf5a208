"""``covidcxr preprocess``: a collection → the cache of model inputs, a QC sheet, a summary.

Registered on the main app in `covidcxr.cli` (``app.command("preprocess")(preprocess)``).
Thin, like the rest of the CLI: the work is in `covidcxr.preprocess.cache` and
`covidcxr.preprocess.qc`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()

_EXAMPLES_PER_REASON = 3


def preprocess(
    data: Annotated[Path, typer.Option("--data", help="A collection folder (any adapter's layout) or a manifest .csv/.parquet.")],
    out: Annotated[Path, typer.Option("--out", help="Cache root; entries go to OUT/<config hash>/.")],
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML of PreprocessConfig fields; the options below override it.")] = None,
    lungs: Annotated[Optional[str], typer.Option(help="mask (Tartaglione), crop (Ben Ahmed) or none. [default: mask]")] = None,
    size: Annotated[Optional[str], typer.Option(help="Model input: N (square) or HxW, e.g. 200x266 (Apostolopoulos). [default: 224]")] = None,
    mask_source: Annotated[Optional[str], typer.Option(help="model, manifest (the manifest's masks) or auto (manifest where present, else model). [default: model]")] = None,
    equalization: Annotated[Optional[str], typer.Option(help="histogram, clahe or none. [default: histogram]")] = None,
    jpeg_quality: Annotated[Optional[int], typer.Option(help="Re-encode as JPEG at this quality first (Hall et al.: 90). [default: off]")] = None,
    segmenter_weights: Annotated[Optional[str], typer.Option(help="Lung U-Net weights (default: the shipped ones).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Adapter name for --data (see `covidcxr data sources`); detected if omitted.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    qc_sample: Annotated[int, typer.Option(help="Images on the QC contact sheet (stratified by source x label; 0 = none).")] = 24,
    cache: Annotated[str, typer.Option("--cache", help="full (model input + QC thumbnails) or model_only (model input only; QC says what it lacks).")] = "full",
) -> None:
    """Equalise -> segment -> mask/crop -> resize every image into a content-keyed cache, with QC.

    Resumable: images already in the cache are hits. Unusable images are listed with the
    reason and the run goes on.
    """
    from covidcxr.data.manifest import read_manifest
    from covidcxr.data.sources import load_source
    from covidcxr.errors import CovidCXRError
    from covidcxr.preprocess.cache import preprocess_collection
    from covidcxr.preprocess.pipeline import PreprocessConfig
    from covidcxr.preprocess.qc import write_qc

    overrides = {
        "lungs": lungs,
        "size": size,
        "mask_source": mask_source,
        "equalization": equalization,
        "jpeg_quality": jpeg_quality,
        "segmenter_weights": segmenter_weights,
    }
    if config is not None:
        settings = PreprocessConfig.from_yaml(config, **overrides)
    else:
        settings = PreprocessConfig.from_mapping({k: v for k, v in overrides.items() if v is not None}, origin="options")

    if data.is_file():
        manifest, adapter_rejected = read_manifest(data), []
    elif data.is_dir():
        table = load_source(data, source)
        manifest, adapter_rejected = table.manifest, list(table.rejected)
    else:
        raise CovidCXRError(f"--data {data} does not exist; expected a collection folder or a manifest file")

    result = preprocess_collection(manifest, settings, out, workers=workers, progress=True, cache_mode=cache)
    paths = write_qc(result.index, result.config_dir, sample=qc_sample)

    summary = Table(title=f"preprocess -> {result.config_dir}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    usable = result.processed - len(result.rejected)
    for what, value in (
        ("images", result.processed),
        ("cache hits", result.hits),
        ("computed (misses)", result.misses),
        ("not processed (unreadable, no mask)", result.errors),
        ("rejected (all reasons)", len(result.rejected)),
        ("damaged cache entries rebuilt", len(result.rebuilt)),
        ("usable for training", usable),
        ("seconds", f"{result.seconds:.1f}"),
        ("images/s", f"{result.images_per_second:.1f}"),
    ):
        summary.add_row(what, str(value))
    console.print(summary)
    console.print(f"config {settings.config_hash()[:16]}: {settings.model_dump(mode='json')}", highlight=False, soft_wrap=True)
    if result.rejected:
        console.print(f"[red]{len(result.rejected)} rejected image(s)[/red], by reason:")
        reasons = Counter(_reason_kind(r.reason) for r in result.rejected)
        for reason, count in reasons.most_common():
            console.print(f"  {count:5d}  {reason}", highlight=False, soft_wrap=True)
            examples = [r for r in result.rejected if _reason_kind(r.reason) == reason][:_EXAMPLES_PER_REASON]
            for item in examples:
                console.print(f"         [red]rejected[/red] {item.path}: {item.reason}", highlight=False, soft_wrap=True)
            if count > len(examples):
                console.print(f"         ... and {count - len(examples)} more (all in {paths['qc_csv']})", soft_wrap=True)
    for item in adapter_rejected:
        console.print(f"  [yellow]not in the manifest[/yellow] {item.path}: {item.reason}", highlight=False, soft_wrap=True)
    console.print(f"index: {result.config_dir / 'index.parquet'}", soft_wrap=True)
    console.print(f"config: {result.config_dir / 'config.yaml'}", soft_wrap=True)
    console.print(f"qc: {paths['qc_csv']}" + (f", {paths['contact_sheet']}" if "contact_sheet" in paths else ""), soft_wrap=True)


def _reason_kind(reason: str) -> str:
    # Group "cannot read image /a/b.png: truncated PNG" under "cannot read image: truncated PNG".
    if reason.startswith("cannot read image ") and ": " in reason:
        return "cannot read image: " + reason.split(": ", 1)[1]
    if reason.startswith("lung crop too small"):
        return "lung crop too small (a side below the minimum fraction)"
    return reason
