"""``covidcxr train``: a recipe -> a run directory (checkpoints, predictions, metrics), resumable.

Registered on the main app in `covidcxr.cli` (``app.command("train")(train)``). Thin: the
work is in `covidcxr.train` (recipe validation, data module, Lightning module, runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _devices_override(value: str) -> str:
    text = value.strip()
    if "," in text:
        return f"engine.devices=[{text}]"
    return f"engine.devices={text}"


def train(
    recipe: Annotated[Path, typer.Argument(help="A training recipe (YAML); see recipes/demo.yaml.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: KEY=VALUE, e.g. --set optimizer.lr=1e-3 (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default: output.run_dir, else output.runs_dir/NAME).")] = None,
    force_new: Annotated[bool, typer.Option("--force-new", help="Move an existing run directory aside and start over.")] = False,
    devices: Annotated[Optional[str], typer.Option(help="Lightning devices: N, 'auto' or a list like 0,1 (engine.devices).")] = None,
    num_nodes: Annotated[Optional[int], typer.Option("--num-nodes", help="Machines for distributed training (engine.num_nodes).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Lightning strategy, e.g. ddp (engine.strategy).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, 32, bf16-mixed or 16-mixed (engine.precision).")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="auto, cpu or gpu (engine.accelerator).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard event files to RUN/tensorboard/ (output.tensorboard; needs the tracking extra: pip install covidcxr\\[tracking]).")] = False,
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", metavar="URI", help="Log parameters and metrics to this MLflow tracking URI, e.g. sqlite:///mlflow.db or http://host:5000 (output.mlflow; needs the tracking extra: pip install covidcxr\\[tracking]).")] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Checkpoints kept once the run is finished (output.keep): all, best (no optimizer state) or last.")] = None,
) -> None:
    """Train a classifier from a recipe into a run directory; re-running resumes it.

    Writes config.yaml, manifest.parquet, checkpoints/ (best, last, snapshots), predictions.parquet, metrics.json, train_log.csv and Lightning's CSV log (lightning_logs/); --tensorboard and --mlflow URI log there too.

    An interrupted run continues from checkpoints/last.ckpt; a finished one is not retrained; another experiment in the same directory is refused (use --force-new or another --run-dir).
    """
    from covidcxr.train import load_recipe, train_recipe

    overrides = list(set_ or [])
    if devices is not None:
        overrides.append(_devices_override(devices))
    if tensorboard:
        overrides.append("output.tensorboard=true")
    for key, value in (("engine.num_nodes", num_nodes), ("engine.strategy", strategy), ("engine.precision", precision), ("engine.accelerator", accelerator), ("output.mlflow", mlflow), ("output.keep", keep)):
        if value is not None:
            overrides.append(f"{key}={value}")
    settings = load_recipe(recipe, overrides)
    result = train_recipe(settings, run_dir=run_dir, force_new=force_new, progress=progress, say=lambda m: console.print(m, highlight=False, soft_wrap=True))
    if not result.metrics and result.status != "interrupted":
        return  # another process of a multi-device run: rank 0 reports
    if result.status == "interrupted":
        console.print(f"[yellow]interrupted[/yellow]; re-run the same command to resume from {result.run_dir / 'checkpoints' / 'last.ckpt'}")
        raise typer.Exit(1)
    _print_summary(result)


def _fmt(value: object) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _print_summary(result) -> None:  # noqa: ANN001 - a RunResult
    metrics = result.metrics
    table = Table(title=f"{result.run_dir} ({result.status})")
    for column in ("split", "n", "patients", "AUC", "accuracy", "bal. accuracy", "sensitivity", "specificity"):
        table.add_column(column, justify="right" if column != "split" else "left")
    if metrics.get("kind") == "kfold":
        oof = metrics.get("out_of_fold", {})
        table.add_row("out-of-fold test", _fmt(oof.get("n")), _fmt(oof.get("n_patients")), _fmt(oof.get("auc")), _fmt(oof.get("accuracy")), _fmt(oof.get("balanced_accuracy")), _fmt(oof.get("sensitivity")), _fmt(oof.get("specificity")))
        console.print(table)
        console.print(f"per-fold test AUC: {[_fmt(a) for a in metrics.get('per_fold_test_auc', [])]}; mean {_fmt(metrics.get('test_auc_mean'))} (sd {_fmt(metrics.get('test_auc_sd'))})")
    else:
        for split in ("val", "test"):
            m = metrics.get(split)
            if m:
                table.add_row(split, _fmt(m.get("n")), _fmt(m.get("n_patients")), _fmt(m.get("auc")), _fmt(m.get("accuracy")), _fmt(m.get("balanced_accuracy")), _fmt(m.get("sensitivity")), _fmt(m.get("specificity")))
        console.print(table)
        snapshots = metrics.get("snapshots")
        if snapshots and snapshots.get("ensemble"):
            ens = snapshots["ensemble"]
            console.print(f"snapshot ensemble of {len(snapshots['files'])}: val AUC {_fmt(ens.get('val', {}).get('auc'))}, test AUC {_fmt(ens.get('test', {}).get('auc'))} (predictions.parquet 'probability'; 'probability_best' is best.ckpt)")
        console.print(
            f"epochs {metrics.get('epochs_trained')} (best {metrics.get('best_epoch')}), global step {metrics.get('global_step')}, "
            f"{_fmt(metrics.get('train_images_per_second'))} training images/s, precision {metrics.get('engine', {}).get('precision')}"
        )
        excluded = metrics.get("excluded", {})
        if excluded.get("count"):
            console.print(f"[yellow]{excluded['count']} image(s) excluded[/yellow] (see {result.run_dir / 'excluded.csv'}): {excluded.get('by_reason')}")
    console.print(f"predictions: {result.run_dir / 'predictions.parquet'}", soft_wrap=True)
