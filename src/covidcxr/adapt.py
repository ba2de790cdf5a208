"""Adaptation of a trained run to a new site: ``covidcxr adapt RUN --data DIR [--labels N]``.

A model trained on a few hospitals loses accuracy at a hospital it never saw. Two ways
back, each writing a **new run directory** that remembers its parent (``adaptation.json``,
field ``parent_run``; the parent is never modified):

* **without labels — AdaBN** (Li et al. 2016, "Revisiting batch normalization for practical
  domain adaptation", arXiv:1603.04779; Pattern Recognition 80:109, 2018): the network's
  weights stay; every BatchNorm layer's running mean and variance are reset and
  re-estimated on unlabelled images of the target site — the images go through the run's
  own preprocessing, the BatchNorm layers (only) in train mode with ``momentum=None`` (a
  cumulative average over all batches), no gradient. Dropout stays in eval mode, so the
  statistics are those the network sees at inference;
* **with N labelled target images — fine-tuning** (Ben Ahmed et al. 2021, IEEE Access
  9:35437, §III and Table 4): the experiment grid's local adaptation
  (`covidcxr.experiments`) reused as is — N images of the target source, half of the
  scored class, half of the others, drawn patient by patient
  (`covidcxr.experiments.testsets.write_adaptation_manifest`), a fine-tuning recipe made
  from the parent's (`covidcxr.experiments.recipe.adaptation_recipe`: the parent's
  backbone, its head trained anew) and trained by `covidcxr.train.run.train_recipe`.

**What the new run saw.** Its ``manifest.parquet`` holds the target images: ``train``
(and ``val``) are the images used to adapt (AdaBN: a share ``fraction`` of the target
patients, without their labels, role ``adapt_unlabelled``), ``test`` the rest of the
target source — none linked (patient, near-duplicate group, file hash, path) to what the
parent trained or validated on, nor to the adaptation images. So ``covidcxr evaluate`` and
``covidcxr audit`` work on it like on any run and test it only on images it never saw;
the parent's own images are reached through ``parent_run``.

**Before and after**, on the same target test images
(`covidcxr.experiments.runner.evaluate_adaptation`): AUC per source with patient-bootstrap
CIs, accuracy per class, McNemar on the paired decisions and DeLong on the AUCs.

Example:
    >>> result = adapt_run("runs/demo", "hospital_x/")                 # doctest: +SKIP
    >>> result.summary["before"]["hospital_x"]["auc"]["estimate"], result.summary["after"]["hospital_x"]["auc"]["estimate"]  # doctest: +SKIP
    (0.61, 0.74)
    >>> parent_run(result.run_dir)                                     # doctest: +SKIP
    PosixPath('runs/demo')
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text

__all__ = ["ADAPTATION_FILE", "PARENT_FIELD", "AdaptResult", "adabn", "adapt_run", "parent_run"]

#: the file of an adapted run that says where it came from (one field: `PARENT_FIELD`).
ADAPTATION_FILE = "adaptation.json"
#: the one field naming the parent run directory (to move to the run-directory module later).
PARENT_FIELD = "parent_run"
MANIFEST_NAME = "adapt-manifest.csv"


@dataclass
class AdaptResult:
    """What `adapt_run` did.

    Attributes:
        run_dir: the new run directory.
        parent: the parent run directory.
        method: ``adabn`` or ``finetune``.
        summary: the content of ``adaptation.json`` (before/after metrics included).
    """

    run_dir: Path
    parent: Path
    method: str
    summary: dict[str, Any] = field(default_factory=dict)


def parent_run(run_dir: str | Path) -> Path | None:
    """The parent of an adapted run (``adaptation.json`` field ``parent_run``), None for a trained run.

    Raises:
        CovidCXRError: ``adaptation.json`` exists but is unreadable or has no ``parent_run``.
    """
    path = Path(run_dir) / ADAPTATION_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))[PARENT_FIELD]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CovidCXRError(f"{path}: unreadable, or no '{PARENT_FIELD}' field ({exc})") from None
    return Path(value)


# ---------------------------------------------------------------------------------- AdaBN


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(model: nn.Module, images: np.ndarray, normalize: Callable[[np.ndarray], torch.Tensor], batch_size: int = 32) -> int:
    """Re-estimate every BatchNorm layer's statistics on ``images`` (AdaBN, Li et al. 2016), in place.

    Args:
        model: the network (its weights are not changed; its BatchNorm buffers are).
        images: ``(N, H, W)`` model inputs in [0, 1] (the run's preprocessing applied).
        normalize: ``(n, H, W)`` -> the network's input tensor (`LoadedRun.normalize`).
        batch_size: images per forward pass.

    Returns:
        The number of BatchNorm layers re-estimated.

    Raises:
        CovidCXRError: the network has no BatchNorm layer, or no image is given.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> adabn(net, np.full((4, 8, 8), 0.5, np.float32), lambda x: torch.as_tensor(x)[:, None])
        1
    """
    layers = _batchnorms(model)
    if not layers:
        raise CovidCXRError("AdaBN re-estimates BatchNorm statistics; this network has no BatchNorm layer (use --labels N to fine-tune)")
    if len(images) == 0:
        raise CovidCXRError("AdaBN needs target images; none was left after the preprocessing")
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    model.eval()  # dropout and the rest as at inference ...
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over every batch
        layer.train()  # ... only BatchNorm collects statistics
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size]))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
        model.eval()
    return len(layers)


# ---------------------------------------------------------------------------------- target images


def _stage_one(parent_dir: Path) -> Any:
    """The parent's stage-1 (pretraining) run as a `PretrainRun`, when it started from one of our runs."""
    from covidcxr.experiments.recipe import PretrainRun
    from covidcxr.train.recipe import load_recipe

    try:
        pretrained = (json.loads((parent_dir / "metrics.json").read_text(encoding="utf-8")) or {}).get("pretrained") or {}
    except (OSError, ValueError):
        return None
    if pretrained.get("kind") != "run" or not pretrained.get("source"):
        return None
    run = Path(pretrained["source"]).parent.parent  # RUN/checkpoints/best.ckpt -> RUN
    if not (run / "manifest.parquet").is_file() or not (run / "config.yaml").is_file():
        return None
    return PretrainRun(key="pretrain", recipe=load_recipe(run / "config.yaml").with_updates({"output.run_dir": str(run)}))


def _point(parent_dir: Path, parent_recipe: Any, data: Path) -> Any:
    """The parent as an experiment grid point whose collection is the target folder.

    Its stage-1 run (if any) comes along, so target images linked to what either trained
    or validated on are never used to adapt nor to test (`write_adaptation_manifest`'s rule).
    """
    from covidcxr.experiments.recipe import GridPoint
    from covidcxr.train.recipe import recipe_from_mapping

    mapping = parent_recipe.resolved()
    mapping["data"].pop("synthetic", None)
    mapping["data"].pop("manifest", None)
    mapping["data"].update({"collection": str(data), "adapter": None, "sources": [], "negatives_from": []})
    mapping["data"]["split"] = {**mapping["data"]["split"], "kind": "holdout", "fold": None, "test_source": None}
    mapping["output"]["run_dir"] = str(parent_dir)
    return GridPoint(key="parent", labels={}, recipe=recipe_from_mapping(mapping, origin=f"--data {data}"), pretrain=_stage_one(parent_dir))


def _target_rows(point: Any, source: str | None) -> tuple[pd.DataFrame, str]:
    """The target folder's images that fit the task, of one source, none linked to the parent's training."""
    from covidcxr.experiments.testsets import linked_to, task_rows

    data = point.recipe.data.collection
    rows = task_rows(point.recipe)
    present = sorted(set(rows["source"].astype(str)))
    if source is None:
        if len(present) != 1:
            raise CovidCXRError(f"--data {data}: the collection has sources {present}; name the target with --source")
        source = present[0]
    if source not in present:
        raise CovidCXRError(f"--source {source!r}: not among the sources of {data} that fit the task ({present})")
    rows = rows[rows["source"].astype(str) == source]
    used = []
    for run in [point.run_dir, *([point.pretrain.run_dir] if point.pretrain is not None else [])]:
        manifest = pd.read_parquet(Path(run) / "manifest.parquet")
        used.append(manifest[manifest["split"].isin(["train", "val"])])
    rows = rows[~linked_to(rows, used)].reset_index(drop=True)
    if rows.empty:
        raise CovidCXRError(f"--data {data}: every image of {source!r} is linked to the parent's training images; nothing to adapt to")
    return rows, source


def _split_unlabelled(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Adaptation (train) vs test images by patient, without looking at the labels."""
    from covidcxr.data.splits import split_train_val_test

    if not 0.0 < fraction < 1.0:
        raise CovidCXRError(f"--fraction: the share of target patients used to adapt must be in (0, 1); got {fraction}")
    out = split_train_val_test(rows, test_size=1.0 - fraction, val_size=0.0, stratify=("source",), seed=seed)
    if not (out["split"] == "train").any() or not (out["split"] == "test").any():
        raise CovidCXRError(f"--fraction {fraction}: {len(rows)} target images cannot be split into adaptation and test images")
    return out


# ---------------------------------------------------------------------------------- the new run


def _write_adabn_run(run_dir: Path, recipe: Any, model: nn.Module, parent_info: dict[str, Any], provenance: dict[str, Any]) -> None:
    """config.yaml and checkpoints/best.ckpt of an AdaBN run (a checkpoint `load_checkpoint_model` reads)."""
    from covidcxr.train.module import _primitive  # noqa: PLC2701 - the checkpoint's own serialisation rule

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", recipe.to_yaml())
    checkpoint = {
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": {"recipe": recipe.resolved()},
        "covidcxr": _primitive({**parent_info, **provenance, "config_hash": recipe.config_hash()}),
        "epoch": parent_info.get("epoch"),
        "global_step": parent_info.get("global_step"),
    }
    checkpoint["covidcxr"].pop("recipe", None)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    with atomic_path(run_dir / "checkpoints" / "best.ckpt") as tmp:
        torch.save(checkpoint, tmp)


def _write_outputs(run_dir: Path, recipe: Any, fit_rows: pd.DataFrame, scored: pd.DataFrame, extra: dict[str, Any]) -> dict[str, Any]:
    """manifest.parquet, predictions.parquet and metrics.json of an AdaBN run."""
    from covidcxr.train.run import split_metrics

    fit = fit_rows.assign(role="adapt_unlabelled")
    test = scored.assign(role="adapt_test", split="test")
    manifest = pd.concat([fit, test.drop(columns=["positive", "probability", "probabilities", "seen"], errors="ignore")], ignore_index=True)
    with atomic_path(run_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    keep = [c for c in ("image", "split", "source", "patient_id", "label", "finding", "view", "class_name", "target", "role", "cache_key", "file_sha1") if c in test.columns]
    predictions = test[keep].copy()
    predictions.insert(0, "run", recipe.name)
    classes = list(recipe.classes)
    if recipe.num_outputs == 1:
        predictions["probability"] = test["probability"].to_numpy(dtype=np.float64)
        predictions["predicted"] = (predictions["probability"] >= 0.5).astype(np.int64)
    else:
        matrix = np.array([json.loads(v) for v in test["probabilities"]], dtype=np.float64)
        for k, name in enumerate(classes):
            predictions[f"prob_{name}"] = matrix[:, k]
        predictions["predicted"] = matrix.argmax(axis=1)
    with atomic_path(run_dir / "predictions.parquet") as tmp:
        predictions.to_parquet(tmp, index=False)
    metrics = {
        "run": recipe.name,
        "status": "complete",
        "task": recipe.data.task,
        "classes": classes,
        "model": recipe.model.name,
        "config_hash": recipe.config_hash(),
        "n_images": {s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        "n_patients": {s: int(manifest.loc[manifest["split"] == s, "patient_id"].nunique()) for s in ("train", "val", "test")},
        **extra,
        **split_metrics(recipe, predictions),
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _say(message: str) -> None:
    print(message, flush=True)


def adapt_run(
    run: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    labels: int | None = None,
    source: str | None = None,
    fraction: float = 0.5,
    overrides: Sequence[str] = (),
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = False,
    say: Callable[[str], None] = _say,
) -> AdaptResult:
    """Adapt a trained run to a new site's images; write the adapted run beside it.

    Args:
        run: the parent run directory (binary or multi-class; for k-fold runs one ``fold-k``).
        data: the target collection (any layout `covidcxr.data.sources.load_source` reads).
        out: the new run directory (default: ``<run>-adabn-<source>`` or
            ``<run>-finetune<N>-<source>`` beside the parent).
        labels: None for AdaBN (no label is read to adapt); N to fine-tune on N labelled
            target images (Ben Ahmed et al. 2021).
        source: the target source inside ``data`` (needed when it holds several).
        fraction: AdaBN: the share of target patients whose images adapt the statistics
            (the rest are the test images).
        overrides: fine-tuning: ``key=value`` recipe overrides (``train.epochs=20``).
        seed: the seed of the patient draws.
        n_boot: patient-bootstrap resamples behind the before/after CIs.
        progress: show the preprocessing progress bars.
        say: where one-line messages go.

    Returns:
        An `AdaptResult`; its ``summary`` is ``adaptation.json``.

    Raises:
        CovidCXRError: not a run, a target without usable images, a network without
            BatchNorm (AdaBN), too few labelled images (fine-tuning).
    """
    from covidcxr.train.inference import load_run

    parent = load_run(run)
    parent_dir = parent.run_dir.resolve()
    if not (parent_dir / "manifest.parquet").is_file():
        raise CovidCXRError(f"run {parent_dir}: no manifest.parquet (expected a run directory written by covidcxr train)")
    data = Path(data).resolve()
    if not data.is_dir():
        raise CovidCXRError(f"--data {data}: not a folder")
    point = _point(parent_dir, parent.recipe, data)
    rows, source = _target_rows(point, source)
    method = "adabn" if labels is None else "finetune"
    default_name = f"{parent_dir.name}-adabn-{source}" if labels is None else f"{parent_dir.name}-finetune{labels}-{source}"
    run_dir = Path(out).resolve() if out is not None else parent_dir.parent / default_name
    if run_dir == parent_dir:
        raise CovidCXRError("--out: the adapted run must not overwrite its parent")
    if (run_dir / ADAPTATION_FILE).is_file():
        raise CovidCXRError(f"--out {run_dir}: an adapted run is already there; choose another --out or remove it")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / MANIFEST_NAME).is_file():
        raise CovidCXRError(f"--out {run_dir}: the folder holds something else (not an interrupted adaptation); choose another --out")
    started = time.perf_counter()
    if labels is None:
        adapt, fit_rows, extra = _adabn(parent, point, rows, source, run_dir, fraction, seed, progress, say)
    else:
        adapt, fit_rows, extra = _finetune(point, rows, source, run_dir, labels, overrides, seed, progress, say)
    after, summary = _before_after(adapt, parent.threshold, n_boot, progress)
    if labels is None:  # fine-tuning wrote its outputs through train_recipe
        _write_outputs(run_dir, adapt.recipe, fit_rows, after, {"threshold": parent.threshold, "adaptation": method})
    say(f"{source}: AUC before {_auc(summary['before'].get(source))} -> after {_auc(summary['after'].get(source))} on {summary['n_test_images']} held-out target images")
    record = {
        PARENT_FIELD: str(parent_dir),
        "method": method,
        "target": {"data": str(data), "source": source, "labels_used": labels is not None},
        "images": {
            "adapt": int(len(fit_rows)),
            "adapt_patients": int(fit_rows["patient_id"].nunique()),
            "test": int(summary["n_test_images"]),
            "test_patients": int(after["patient_id"].nunique()),
        },
        "fraction": fraction if labels is None else None,
        "labels": labels,
        "seed": seed,
        **extra,
        **summary,
        "seconds": round(time.perf_counter() - started, 2),
        "reference": "AdaBN: Li et al. 2016 (arXiv:1603.04779)" if labels is None else "fine-tuning on few target images: Ben Ahmed et al. 2021 (IEEE Access 9:35437), Table 4",
    }
    atomic_write_text(run_dir / ADAPTATION_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return AdaptResult(run_dir=run_dir, parent=parent_dir, method=method, summary=record)


def _auc(metrics: dict[str, Any] | None) -> str:
    auc = (metrics or {}).get("auc") or {}
    if auc.get("estimate") is None:
        return "undefined"
    return f"{auc['estimate']:.3f} [{auc.get('low', float('nan')):.3f}, {auc.get('high', float('nan')):.3f}]"


def _adapt_spec(source: str, positives: int, negatives: int, val_fraction: float, seed: int, overrides: dict[str, Any]) -> Any:
    from covidcxr.experiments.recipe import AdaptSection, AdaptSource

    return AdaptSection(
        positives=AdaptSource(source=source, images=max(positives, 2)),
        negatives=AdaptSource(source=source, images=max(negatives, 2)),
        val_fraction=val_fraction,
        seed=seed,
        set=overrides,
    )


def _adaptation(point: Any, source: str, run_dir: Path, name: str, spec: Any) -> Any:
    """The `AdaptRun` of the experiment grid, for a parent run and a target folder."""
    from covidcxr.experiments.recipe import AdaptRun, adaptation_recipe

    recipe = adaptation_recipe(point.recipe, point.run_dir, [source], dict(spec.set), run_dir / MANIFEST_NAME, f"covidcxr adapt {point.run_dir}")
    recipe = recipe.with_updates({"output.run_dir": str(run_dir), "name": name})
    return AdaptRun(key=f"{name}/adapt", point=point, recipe=recipe, spec=spec)


def _adabn(parent: Any, point: Any, rows: pd.DataFrame, source: str, run_dir: Path, fraction: float, seed: int, progress: bool, say: Callable[[str], None]) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    from covidcxr.data.manifest import write_manifest
    from covidcxr.train.inference import cached_inputs

    split = _split_unlabelled(rows, fraction, seed)
    n_fit = int((split["split"] == "train").sum())
    spec = _adapt_spec(source, n_fit, n_fit, 0.5, seed, {})
    adapt = _adaptation(point, source, run_dir, f"{parent.name}.adabn-{source}", spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(split.drop(columns=["class_name", "target"]), adapt.manifest_path)
    fit_rows, images, _, excluded = cached_inputs(split[split["split"] == "train"].reset_index(drop=True), adapt.recipe, progress=progress)
    say(f"AdaBN: re-estimating BatchNorm statistics on {len(images)} unlabelled {source} images ({len(excluded)} rejected by the preprocessing)")
    model = copy.deepcopy(parent.model)
    layers = adabn(model, images, parent.normalize)
    provenance = {
        "adaptation": "adabn",  # the parent is named in adaptation.json only
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_adaptation_images": int(len(images)),
    }
    _write_adabn_run(run_dir, adapt.recipe, model, parent.info, provenance)
    return adapt, fit_rows, {"batchnorm_layers": layers, "excluded_adapt": int(len(excluded))}


def _finetune(point: Any, rows: pd.DataFrame, source: str, run_dir: Path, labels: int, overrides: Sequence[str], seed: int, progress: bool, say: Callable[[str], None]) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    from covidcxr.experiments.testsets import write_adaptation_manifest
    from covidcxr.train.recipe import apply_overrides
    from covidcxr.train.run import train_recipe

    if labels < 4:
        raise CovidCXRError(f"--labels {labels}: fine-tuning needs at least 4 labelled images (2 per class, some for validation)")
    updates = apply_overrides({}, list(overrides))
    flat: dict[str, Any] = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                flatten(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    flatten("", updates)
    spec = _adapt_spec(source, math.ceil(labels / 2), labels // 2, 0.2, seed, flat)
    adapt = _adaptation(point, source, run_dir, f"{point.run_dir.name}.finetune{labels}-{source}", spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    fit = write_adaptation_manifest(adapt)
    say(f"fine-tuning on {int(fit['split'].isin(['train', 'val']).sum())} labelled {source} images ({fit.loc[fit['split'] != 'test', 'class_name'].value_counts().to_dict()})")
    train_recipe(adapt.recipe, progress=progress, say=say)
    return adapt, fit[fit["split"].isin(["train", "val"])], {}


def _before_after(adapt: Any, threshold: float, n_boot: int, progress: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The parent and the adapted run on the same held-out target images (the experiment grid's rule).

    Returns:
        ``(the adapted run's scored test images, summary)`` (`evaluate_adaptation`).
    """
    from covidcxr.experiments.runner import evaluate_adaptation

    _, after, summary = evaluate_adaptation(adapt, threshold=threshold, n_boot=n_boot, progress=progress)
    return after, summary
