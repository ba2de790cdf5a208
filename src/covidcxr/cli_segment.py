"""``covidcxr segment``: train the lung U-Net and evaluate it against reference masks.

Mounted in `covidcxr.cli` with ``app.add_typer(segment_app, name="segment")``. Thin: every
command calls `covidcxr.preprocess.lungs` / `covidcxr.preprocess.lung_training`. Bad input
raises `CovidCXRError`, which the ``covidcxr`` entry point prints as one red line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from covidcxr.errors import CovidCXRError

segment_app = typer.Typer(help="Lung segmentation: train the U-Net, evaluate it against reference masks.", no_args_is_help=True)

console = Console()
err_console = Console(stderr=True)


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _fmt(value: object, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metrics_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for column, justify in (("group", "left"), ("n", "right"), ("Dice", "right"), ("IoU", "right"), ("HD95 px", "right"), ("lung recall", "right")):
        table.add_column(column, justify=justify)

    def add(name: str, stats: dict[str, Any], style: str | None = None) -> None:
        table.add_row(
            name, str(stats["n"]), _fmt(stats["dice_mean"], 4), _fmt(stats["iou_mean"], 4), _fmt(stats["hd95_mean"], 2), _fmt(stats.get("recall_mean"), 4), style=style
        )

    for source, stats in summary["per_source"].items():
        add(f"source {source}", stats)
    if len(summary.get("per_mask_source", {})) > 1:
        for annotator, stats in summary["per_mask_source"].items():
            add(f"  annotator {annotator}", stats, style="dim")
    add("all", summary, style="bold")
    return table


def _interval(stats: dict[str, Any], key: str = "mean") -> str:
    low, high = stats["ci"]
    return f"{stats[key]:.4f} [{low:.4f}, {high:.4f}]"


def _recall_table(recall: dict[str, Any]) -> Table:
    table = Table(title=f"share of the annotated lung the mask keeps (recall), per label; patient-bootstrap 95% CI; 'cut' = recall < {recall['low_recall']}")
    for column, justify in (("label", "left"), ("n images", "right"), ("n patients", "right"), ("recall [95% CI]", "right"), ("cut", "right")):
        table.add_column(column, justify=justify)
    for name, block in (("per_label", "bold"), ("per_source_label", "dim")):
        for key, stats in recall[name].items():
            table.add_row(key, str(stats["n_images"]), str(stats["n_patients"]), _interval(stats), f"{stats['low_recall_share']:.0%}", style=block if name != "per_label" else None)
    contrast = recall.get("disease_minus_rest")
    if contrast:
        table.add_row(contrast["groups"], str(contrast["n_images"]), str(contrast["n_patients"]), _interval(contrast, "estimate"), "", style="bold")
    return table


def _print_evaluation(summary: dict[str, Any]) -> None:
    console.print(_metrics_table(summary, f"lung segmentation vs '{summary['mask_column']}' ({summary['convention']} convention)"))
    if summary.get("recall_by_label"):
        console.print(_recall_table(summary["recall_by_label"]))
    console.print(f"[dim]{summary['selection']}[/dim]")
    console.print(f"[dim]test-time augmentation: {summary.get('tta', 'none')}[/dim]")
    worst = Table(title=f"{len(summary['worst'])} worst images")
    worst.add_column("image")
    worst.add_column("source")
    worst.add_column("Dice", justify="right")
    worst.add_column("HD95 px", justify="right")
    for item in summary["worst"]:
        worst.add_row(str(item["image"]), str(item["source"]), _fmt(item["dice"], 4), _fmt(item["hd95"], 2))
    console.print(worst)


@segment_app.command("train")
def segment_train(
    data: Annotated[Path, typer.Option(help="A collection folder whose manifest has lung masks (e.g. ../shared/data/cxr).")],
    out: Annotated[Path, typer.Option(help="Folder for lung_unet.pt + lung_unet.json.")],
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping on validation Dice may end sooner).")] = 150,
    size: Annotated[int, typer.Option(help="Network input side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the split, sampler, augmentation and initialisation.")] = 0,
    max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget for fitting, in minutes (counts across resumes).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints and logs; a run folder holding checkpoints/last.ckpt is resumed.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per optimisation step.")] = 8,
    width: Annotated[int, typer.Option(help="U-Net channels at the first of 5 levels (16 -> 1.6 M parameters, 6.5 MB).")] = 16,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better validation Dice.")] = 30,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine decay).")] = 2e-3,
    fast: Annotated[bool, typer.Option("--fast/--fp32", help="bf16 autocast + channels-last (CPU), or plain float32.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Rich progress bar, or one plain line per epoch (for logs).")] = True,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: one per core; 1 is faster on a CPU shared with other jobs).")] = None,
    opacity_prob: Annotated[float, typer.Option(help="Probability of pasting synthetic opacities into a training image's lungs (0: off).")] = 0.0,
    site_prob: Annotated[float, typer.Option(help="Probability of each site-imitating transform: down-up sampling, JPEG, Poisson noise, collimation (0: off).")] = 0.0,
    loss: Annotated[str, typer.Option(help="dice_ce, or tversky_ce (recall-weighted: a missed lung pixel costs more).")] = "dice_ce",
    init_weights: Annotated[Optional[Path], typer.Option(help="Fine-tune from these U-Net weights (same architecture), e.g. the shipped lung_unet.pt.")] = None,
    pseudo_share: Annotated[
        float, typer.Option(help="Self-training: expected share of each epoch's draws from pseudo-labelled unlabelled images of the collection (0: off).")
    ] = 0.0,
    pseudo_keep: Annotated[float, typer.Option(help="Self-training: share of the plausible pseudo-labels kept, most confident first.")] = 0.5,
    teacher: Annotated[Optional[Path], typer.Option(help="Self-training: the weights that pseudo-label (default: --init-weights, else the shipped ones).")] = None,
) -> None:
    """Train the lung U-Net on every masked image, patient-disjoint split, test patients held out."""
    from covidcxr.preprocess.lung_training import TrainSettings, command_line, train_segmenter

    settings = TrainSettings(
        epochs=epochs, size=size, seed=seed, batch_size=batch_size, lr=lr, patience=patience, max_minutes=max_minutes, width=width, fast=fast, threads=threads,
        opacity_prob=opacity_prob, site_prob=site_prob, loss=loss, init_weights=str(init_weights) if init_weights else None,
        pseudo_share=pseudo_share, pseudo_keep=pseudo_keep, teacher=str(teacher) if teacher else None,
    )
    metadata = train_segmenter(data, out, settings, run_dir=run_dir, show_progress=progress, log=console.print, command=command_line())
    test = metadata["metrics"].get("test")
    if test:
        console.print(_metrics_table(test, "held-out test patients (each mask vs the output of its own convention)"))


@segment_app.command("evaluate")
def segment_evaluate(
    data: Annotated[Path, typer.Option(help="Any collection folder whose manifest has lung masks.")],
    weights: Annotated[Optional[Path], typer.Option(help="lung_unet.pt or its folder (default: the shipped weights).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    split_file: Annotated[Optional[Path], typer.Option(help="Whose train/val images to leave out: a lung_unet.json or a split manifest (default: the weights' own).")] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Score every masked image, including those the weights were trained or validated on.")] = False,
    convention: Annotated[str, typer.Option(help="auto (each mask vs the output of its annotator's convention), heart_excluded or retrocardiac.")] = "auto",
    masks: Annotated[str, typer.Option(help="Manifest column of the reference masks: mask or mask_alt (second annotator).")] = "mask",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    tta: Annotated[
        Optional[bool],
        typer.Option(
            "--tta/--no-tta",
            help="Test-time augmentation: average the probability maps over several input scales (the 'multiscale' preset, 2 network passes per image; no flips). Default: the weights' config.tta ('none' for the shipped weights).",
        ),
    ] = None,
    tta_preset: Annotated[Optional[str], typer.Option(help="A named TTA preset instead (none, multiscale, multiscale3, multiscale3_shift); overrides --tta/--no-tta.")] = None,
) -> None:
    """Dice, IoU and HD95 (pixels, at each image's own size) of the post-processed masks.

    By default only images the weights never saw are scored: those whose SHA-1 is not among
    the training/validation images recorded in the weights' metadata — on the training
    collection, exactly its held-out test patients. Pass --all to score every image.
    """
    from covidcxr.data.manifest import is_missing
    from covidcxr.data.sources import load_source
    from covidcxr.preprocess.lungs import LungSegmenter, evaluate_segmenter, held_out_rows, resolve_weights, seen_sha1s

    if masks not in ("mask", "mask_alt"):
        raise CovidCXRError(f"--masks must be mask or mask_alt, not {masks!r}")
    weights_path, _ = resolve_weights(weights)
    segmenter = LungSegmenter.load(weights_path, batch_size=batch_size, tta=tta_preset if tta_preset is not None else tta)
    manifest = load_source(data).manifest
    if masks not in manifest.columns or manifest[masks].map(is_missing).all():
        raise CovidCXRError(f"no image in {data} has a '{masks}' lung mask; nothing to evaluate against")
    rows = manifest[~manifest[masks].map(is_missing)].reset_index(drop=True)
    excluded = 0
    if all_images:
        selection = f"all {len(rows)} images with a '{masks}' (--all), including any the weights were fitted on"
    else:
        if split_file is not None:
            seen, origin = seen_sha1s(split_file), str(split_file)
        elif "split" in segmenter.metadata:
            seen, origin = seen_sha1s(segmenter.metadata), f"{weights_path.with_suffix('.json')}"
        else:
            seen, origin = set(), "none recorded"
        rows, excluded = held_out_rows(rows, seen)
        if rows.empty:
            raise CovidCXRError(f"every masked image in {data} was used to train or validate these weights (split: {origin}); pass --all to score them anyway")
        selection = (
            f"{len(rows)} images never used for training or validation "
            f"({excluded} excluded by SHA-1 as train/val images of the split in {origin}); --all scores every image"
        )
    result = evaluate_segmenter(segmenter, rows, mask_column=masks, convention=convention, show_progress=not json_output)
    summary = result.summary
    summary.update({"selection": selection, "excluded_seen": excluded, "weights": str(weights_path), "data": str(data)})
    if json_output:
        _print_json(summary)
    else:
        _print_evaluation(summary)


@segment_app.command("coverage")
def segment_coverage(
    data: Annotated[Path, typer.Option(help="A collection folder (e.g. ../shared/data/cxr).")],
    weights: Annotated[Optional[Path], typer.Option(help="lung_unet.pt or its folder (default: the shipped weights).")] = None,
    per_group: Annotated[int, typer.Option(help="At most this many images per source x label (0: all), drawn with --seed.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the per-group sample and the bootstrap.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
) -> None:
    """Does the mask shrink on diseased lungs? Mean predicted lung area of COVID/pneumonia over normal, per source.

    Scores the images *without* a reference mask (labels covid, pneumonia, normal), within
    each source that has normals; patient-bootstrap 95% intervals.
    """
    from covidcxr.data.manifest import is_missing
    from covidcxr.data.sources import load_source
    from covidcxr.preprocess.lung_coverage import area_ratio_by_source, mask_areas, sample_per_group
    from covidcxr.preprocess.lungs import LungSegmenter

    manifest = load_source(data).manifest
    unmasked = manifest["mask"].map(is_missing) if "mask" in manifest.columns else manifest["image"].map(lambda _: True)
    rows = manifest[unmasked & manifest["label"].isin(["covid", "pneumonia", "normal"])]
    if rows.empty:
        raise CovidCXRError(f"no COVID, pneumonia or normal image without a lung mask in {data}; nothing to compare")
    rows = sample_per_group(rows, per_group or None, seed=seed)
    segmenter = LungSegmenter.load(weights, batch_size=batch_size)
    ratios = area_ratio_by_source(mask_areas(segmenter, rows, show_progress=not json_output), seed=seed)
    if not ratios:
        raise CovidCXRError(f"no source in {data} has both normal and COVID/pneumonia images without masks; nothing to compare")
    if json_output:
        _print_json({"data": str(data), "images": int(len(rows)), "per_group": per_group, "area_ratio": ratios})
        return
    table = Table(title="predicted lung area (fraction of the image): disease vs normal of the same source; patient-bootstrap 95% CI")
    for column, justify in (("source", "left"), ("group", "left"), ("n images", "right"), ("n patients", "right"), ("value [95% CI]", "right")):
        table.add_column(column, justify=justify)
    for source, entry in ratios.items():
        for key, stats in entry.items():
            ratio = key.endswith("_over_normal")
            table.add_row(source, key.replace("_", " "), str(stats["n_images"]), str(stats["n_patients"]), _interval(stats, "estimate" if ratio else "mean"), style="bold" if ratio else None)
    console.print(table)
