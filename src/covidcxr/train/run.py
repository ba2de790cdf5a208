"""A training run: recipe -> run directory (DESIGN.md), resumable, k-fold aware.

`train_recipe(recipe)` trains one run (or, for ``data.split.kind: kfold`` with no fold,
every fold into ``RUN/fold-<k>/`` and pools the out-of-fold predictions)::

    RUN/
      config.yaml          the resolved recipe, every default filled in
      manifest.parquet     the exact records used: manifest columns + split, fold, target,
                           class_name, role, cache_key, file_sha1
      excluded.csv         rows the preprocessing rejected, with the reason (if any)
      checkpoints/         best.ckpt (by train.monitor; weights only), last.ckpt (every
                           epoch and every train.checkpoint_every_n_steps steps; the only
                           one with optimizer state), snapshot-<k>.ckpt (weights only);
                           once finished, output.keep says which stay
      operating_point.json the decision threshold chosen on validation by the recipe's
                           operating_point rule (+ temperature), `covidcxr.rundir.OperatingPoint`
      predictions.parquet  val and test images: run, split, source, patient_id, label,
                           target, probability (per-class prob_<class> for multi-class),
                           predicted (at the operating point); from the model that is
                           deployed: best.ckpt or the snapshot ensemble's average
      metrics.json         status, val/test metrics at the operating point, ``weights`` (the
                           checkpoint(s) that are the model), ``warnings`` (a hollow run),
                           provenance, timing
      train_log.csv        one row per epoch
      lightning_logs/      Lightning's CSVLogger: metrics.csv (every logged step), hparams.yaml
      tensorboard/         TensorBoard event files (output.tensorboard / --tensorboard)

Every path comes from `covidcxr.rundir.RunDir`, which the readers of a run use too.

**No hollow runs.** A recipe whose freeze policy keeps backbone weights frozen while
``model.pretrained`` is null would train a head on random features; `check_not_hollow`
refuses it (naming the fields and how to supply weights) unless
``model.allow_random_frozen: true``, which the run records as a warning
(``random_frozen_backbone`` in ``metrics.json``, `RunDir.warnings`).

**Resume.** Re-running the same recipe on a run directory that holds ``last.ckpt``
continues from it (the optimizer, schedule, sampler position, early-stopping and
snapshot state included; a checkpoint from the middle of an epoch resumes at the next
batch of that epoch). A different experiment (`TrainRecipe.config_hash` differs) is
refused unless ``force_new``, which moves the old directory aside. A finished run
(``metrics.json`` complete for this hash and epoch count) is not retrained; raising
``train.epochs`` trains it further.

**Loggers** (`_loggers`): Lightning's CSVLogger always; TensorBoard and MLflow
(``output.mlflow`` / ``--mlflow URI``) on request. Each receives the resolved recipe as
hyper-parameters and every metric the module logs.

**Provenance** in every checkpoint (``checkpoint["covidcxr"]``): config hash, manifest
hash, split ids, code version (package version + git commit), classes, pretrained source.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr import __version__
from covidcxr.errors import CovidCXRError
from covidcxr.rundir import OperatingPoint, RunDir
from covidcxr.train.recipe import RecipeError, TrainRecipe, load_recipe

__all__ = ["RunConflictError", "RunResult", "check_not_hollow", "code_version", "read_provenance", "resolve_engine", "split_metrics", "train_recipe"]

CHECKPOINTS = RunDir.CHECKPOINTS


class RunConflictError(CovidCXRError):
    """The run directory holds a different experiment (another config hash)."""


@dataclass
class RunResult:
    """What `train_recipe` did.

    Attributes:
        run_dir: the run directory.
        status: ``"trained"`` (from scratch), ``"resumed"``, ``"finished"`` (already done,
            not retrained) or ``"interrupted"``.
        metrics: the content of ``metrics.json``.
        folds: for a k-fold run, each fold's result.
    """

    run_dir: Path
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    folds: list[RunResult] = field(default_factory=list)

    @property
    def predictions_path(self) -> Path:
        return RunDir(self.run_dir).predictions


# ---------------------------------------------------------------------------------- helpers


def code_version() -> dict[str, Any]:
    """``{"covidcxr": version, "git_commit": sha or None, "git_dirty": bool or None}``."""
    here = Path(__file__).resolve().parent
    commit, dirty = None, None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"covidcxr": __version__, "git_commit": commit, "git_dirty": dirty}


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_engine(recipe: TrainRecipe) -> dict[str, Any]:
    """The Lightning Trainer's hardware arguments, ``auto`` precision resolved.

    ``precision: auto`` -> ``bf16-mixed`` on a GPU with bf16 (else ``16-mixed``) and on a
    CPU with AVX512-BF16/AMX (measured ~3x faster for ResNet-18 training with
    channels_last), else ``32-true``.
    """
    engine = recipe.engine
    accelerator = engine.accelerator
    if accelerator == "cuda":
        accelerator = "gpu"
    resolved = accelerator
    if accelerator == "auto":
        if torch.cuda.is_available():
            resolved = "gpu"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            resolved = "mps"
        else:
            resolved = "cpu"
    precision = engine.precision
    if precision == "auto":
        if resolved == "gpu":
            precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
        elif resolved == "cpu":
            precision = "bf16-mixed" if _cpu_has_fast_bf16() else "32-true"
        else:
            precision = "32-true"
    elif precision in ("32", "64"):
        precision = f"{precision}-true"
    devices: Any = engine.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return {
        "accelerator": accelerator if accelerator != "auto" else resolved,
        "devices": devices,
        "num_nodes": engine.num_nodes,
        "strategy": engine.strategy,
        "precision": precision,
        "deterministic": engine.deterministic,
    }


def read_provenance(checkpoint_path: str | Path) -> dict[str, Any]:
    """``checkpoint["covidcxr"]`` plus ``epoch`` and ``global_step`` (read with ``weights_only=True``)."""
    from covidcxr.io.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(checkpoint_path, mmap=True)
    info = dict(checkpoint.get("covidcxr") or {})
    info["epoch"] = checkpoint.get("epoch")
    info["global_step"] = checkpoint.get("global_step")
    return info


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _move_aside(run_dir: Path, say: Callable[[str], None]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    shutil.move(str(run_dir), str(target))
    say(f"--force-new: moved the previous run to {target}")


def _quiet_lightning_warnings() -> None:
    """Silence Lightning's warnings that are expected here (call inside ``warnings.catch_warnings``)."""
    for message in (
        ".*does not have many workers.*",  # num_workers=0 is the fast choice for in-memory CPU data
        ".*smaller than the logging interval.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",  # Lightning 2.6 on torch 2.13 (its own deprecation)
        ".*exists and is not empty.*",  # resuming into checkpoints/ is the point
        ".*module\\(s\\) in eval mode at the start of training.*",  # frozen BatchNorm, on purpose
        ".*sync_dist=True.*",  # every process validates the whole split: the values agree already
    ):
        warnings.filterwarnings("ignore", message=message)


def _say_default(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------- state


def _existing_state(recipe: TrainRecipe, run_dir: Path, force_new: bool, say: Callable[[str], None]) -> str:
    """``"new"``, ``"resume"`` or ``"finished"``; raises `RunConflictError` on another experiment."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    wanted = recipe.config_hash()
    rd = RunDir(run_dir)
    last = rd.last_checkpoint
    metrics = _read_json(rd.metrics) or {}
    found: str | None = None
    where = ""
    if last.is_file():
        try:
            found, where = read_provenance(last).get("config_hash"), str(last)
        except Exception as exc:  # an unreadable checkpoint: say so, do not guess
            if not force_new:
                raise RunConflictError(f"{last} cannot be read ({exc}); re-run with --force-new to start over") from None
    elif metrics.get("config_hash"):
        found, where = metrics["config_hash"], str(rd.metrics)
    elif rd.config.is_file():
        try:
            found, where = load_recipe(rd.config).config_hash(), str(rd.config)
        except CovidCXRError:
            found, where = "unreadable", str(rd.config)
    if found is not None and found != wanted:
        if force_new:
            _move_aside(run_dir, say)
            return "new"
        raise RunConflictError(
            f"run directory {run_dir} holds another experiment (config hash {str(found)[:12]} in {where}, "
            f"this recipe {wanted[:12]}); choose another --run-dir, or --force-new to move the old run aside"
        )
    if force_new:
        _move_aside(run_dir, say)
        return "new"
    if metrics.get("status") == "complete" and metrics.get("config_hash") == wanted and metrics.get("epochs_requested") == recipe.train.epochs:
        return "finished"
    pruned = (metrics.get("checkpoints") or {}).get("keep")
    if metrics.get("status") == "complete" and pruned == "best" and not last.is_file():
        raise RunConflictError(
            f"run {run_dir} finished with output.keep=best, which removed last.ckpt: it cannot be trained "
            f"to {recipe.train.epochs} epochs from where it stopped; --force-new retrains it from scratch"
        )
    if last.is_file():
        return "resume"
    return "new"


# ---------------------------------------------------------------------------------- pretrained


def _pretrained_source(recipe: TrainRecipe, say: Callable[[str], None], progress: bool) -> tuple[Path | None, str | None]:
    """The file to initialise from (training a pretraining recipe first if one is named)."""
    source = recipe.model.pretrained
    if not source:
        return None, None
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise CovidCXRError(f"model.pretrained: recipe {path} does not exist")
        stage_one = load_recipe(path)
        say(f"two-stage: pretraining recipe {path} -> {stage_one.run_dir()}")
        result = train_recipe(stage_one, progress=progress, say=say)
        path = result.run_dir
    if path.is_dir():
        stage_one = RunDir(path)
        if stage_one.is_kfold_root:
            raise CovidCXRError(f"model.pretrained: {path} is a k-fold run; name one fold's directory ({path}/fold-0)")
        # The encoder comes from one checkpoint (an ensemble has no single encoder): best, else last.
        checkpoint = stage_one.best_checkpoint
        if not checkpoint.is_file():
            checkpoint = stage_one.last_checkpoint
        if not checkpoint.is_file():
            raise CovidCXRError(f"model.pretrained: run directory {path} has no checkpoints/best.ckpt or last.ckpt")
        config = stage_one.config
        if config.is_file():
            theirs = load_recipe(config).model
            if theirs.name.split(".")[0] != recipe.model.name.split(".")[0] or theirs.in_channels != recipe.model.in_channels:
                raise CovidCXRError(
                    f"model.pretrained: run {path} trained {theirs.name} ({theirs.in_channels} channel), this recipe "
                    f"builds {recipe.model.name} ({recipe.model.in_channels} channel); the encoder cannot be reused"
                )
        return checkpoint, "run"
    if not path.is_file():
        raise CovidCXRError(f"model.pretrained: {path} is neither a file, a run directory nor a recipe")
    return path, "file"


def initialize_pretrained(model: torch.nn.Module, recipe: TrainRecipe, say: Callable[[str], None] = _say_default, progress: bool = True) -> dict[str, Any] | None:
    """Load ``model.pretrained`` into ``model`` (backbone only; the head stays new).

    Returns:
        ``{"source", "kind", "loaded", "skipped_head", "adapted"}`` or None (random init).
    """
    from covidcxr.models import load_encoder, load_pretrained

    path, kind = _pretrained_source(recipe, say, progress)
    if path is None:
        return None
    report = load_encoder(model, path) if kind == "run" else load_pretrained(model, path)
    say(f"pretrained: {len(report.loaded)} backbone tensors from {path} (head left new: {len(report.skipped_head)} tensors skipped)")
    return {"source": str(path), "kind": kind, "loaded": len(report.loaded), "skipped_head": len(report.skipped_head), "adapted": list(report.adapted)}


# ---------------------------------------------------------------------------------- hollow runs


def check_not_hollow(recipe: TrainRecipe) -> list[dict[str, Any]]:
    """Refuse a run whose frozen backbone would be random; the warnings a run must carry.

    A freeze policy keeps backbone weights as they were loaded; with ``model.pretrained``
    null they are random, so the frozen layers compute random features and only the rest
    learns — a hollow run, whatever its numbers say (Hall, Ben Ahmed and Apostolopoulos
    froze *ImageNet* layers).

    Returns:
        The run's warnings (``{"id", "severity", "text"}``): ``random_frozen_backbone``
        when ``model.allow_random_frozen`` lets such a run train; ``paper_weights_missing``
        when the model's paper fine-tuned pretrained weights (its recipe freezes) and this
        run trains every layer from random weights instead.

    Raises:
        RecipeError: frozen random backbone weights without ``model.allow_random_frozen``;
            the message names the fields and how to supply weights.
    """
    from covidcxr.models import get_model_cfg
    from covidcxr.train.module import build_model

    spec = recipe.model
    if spec.pretrained:
        return []
    model = build_model(recipe)
    backbone = list(model.backbone_named_parameters())
    frozen = sum(p.numel() for _, p in backbone if not p.requires_grad)
    total = sum(p.numel() for _, p in backbone)
    cfg = get_model_cfg(spec.name)
    policy = cfg.get("freeze_policy", "none") if spec.freeze == "default" else spec.freeze
    out: list[dict[str, Any]] = []
    if frozen:
        text = (
            f"model.freeze {policy!r} keeps {frozen:,} of {total:,} backbone parameters of {spec.name} frozen, and "
            "model.pretrained is null, so they stay at their random initial values: the run trains on random features"
        )
        if not spec.allow_random_frozen:
            raise RecipeError(
                f"recipe field 'model.pretrained': {text}. Supply weights with --set model.pretrained=PATH (a torchvision-named "
                "ImageNet state dict you downloaded yourself — covidcxr never downloads —, a run directory, or a pretraining "
                "recipe), or train every layer with --set model.freeze=none, or set model.allow_random_frozen=true to train it "
                "anyway (the run is then flagged as hollow in its metrics and report)",
                ["model.pretrained", "model.freeze", "model.allow_random_frozen"],
            )
        out.append({"id": "random_frozen_backbone", "severity": "warning", "text": text + " (model.allow_random_frozen: true)."})
    elif cfg.get("paper") and cfg.get("freeze_policy", "none") != "none":
        citation = str(cfg.get("citation") or cfg["paper"]).split(".")[0]
        out.append({
            "id": "paper_weights_missing",
            "severity": "info",
            "text": f"{citation} fine-tuned pretrained {cfg['name']} weights; this run trains every layer from random weights, so its numbers are not the paper's.",
        })
    return out


# ---------------------------------------------------------------------------------- one run


def _write_prepared(run_dir: Path, prepared: Any, notes: list[str], rejected: Sequence[Any]) -> None:
    rd = RunDir(run_dir)
    rd.write_manifest(prepared.records)
    excluded = prepared.excluded
    extra = pd.DataFrame([{"image": r.path, "split": "", "source": "", "reason": r.reason} for r in rejected])
    table = pd.concat([excluded, extra], ignore_index=True) if len(extra) else excluded
    if len(table):
        rd.write_excluded(table)


def _predict(trainer: Any, module: Any, datamodule: Any, checkpoint: Path, splits: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (rows into records, probabilities, logits)} from one checkpoint."""
    loaders = [datamodule.eval_dataloader(s) for s in splits]
    outputs = trainer.predict(module, dataloaders=loaders, ckpt_path=str(checkpoint), weights_only=True)
    if len(splits) == 1:
        outputs = [outputs]
    result = {}
    for split, batches in zip(splits, outputs):
        dataset = datamodule.datasets[split]
        positions = torch.cat([b["rows"] for b in batches]).numpy()
        probabilities = torch.cat([b["probabilities"] for b in batches]).float().numpy()
        logits = torch.cat([b["logits"] for b in batches]).float().numpy()
        result[split] = (np.asarray(dataset.rows)[positions], probabilities, logits)
    return result


def _ensemble(runs: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]], binary: bool) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The snapshot members' average probability (Hall et al.) and its logit (`average_logits`), per split."""
    from covidcxr.models.ensemble import average_logits

    out = {}
    for split in runs[0]:
        logits = average_logits([torch.from_numpy(r[split][2]) for r in runs], binary).numpy()
        out[split] = (runs[0][split][0], np.mean([r[split][1] for r in runs], axis=0), logits)
    return out


def _prediction_frame(recipe: TrainRecipe, records: pd.DataFrame, per_split: dict[str, tuple[np.ndarray, ...]], best: dict[str, tuple[np.ndarray, ...]] | None, threshold: float = 0.5) -> pd.DataFrame:
    classes = list(recipe.classes)
    frames = []
    keep = [c for c in ("image", "split", "fold", "source", "patient_id", "label", "finding", "view", "class_name", "target", "role", "shortcut", "cache_key", "file_sha1") if c in records.columns]
    for split, (rows, probabilities, *_) in per_split.items():
        part = records.iloc[rows][keep].copy()
        if recipe.num_outputs == 1:
            part["probability"] = probabilities.reshape(-1).astype(np.float64)
            part["predicted"] = (part["probability"] >= threshold).astype(np.int64)
            if best is not None:
                b_rows, b_prob, *_ = best[split]
                lookup = dict(zip(b_rows.tolist(), b_prob.reshape(-1).tolist()))
                part["probability_best"] = [lookup[r] for r in rows.tolist()]
        else:
            for k, name in enumerate(classes):
                part[f"prob_{name}"] = probabilities[:, k].astype(np.float64)
            part["predicted"] = probabilities.argmax(axis=1).astype(np.int64)
            part["predicted_class"] = [classes[i] for i in part["predicted"]]
        frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "run", recipe.name or "run")
    return frame


def _split_metrics(recipe: TrainRecipe, predictions: pd.DataFrame, column: str = "probability", threshold: float = 0.5) -> dict[str, Any]:
    from covidcxr.train.metrics import classification_metrics

    out = {}
    for split, part in predictions.groupby("split", sort=True):
        if recipe.num_outputs == 1:
            probabilities = part[column].to_numpy()
        else:
            probabilities = part[[f"prob_{c}" for c in recipe.classes]].to_numpy()
        metrics = classification_metrics(probabilities, part["target"].to_numpy(), num_classes=len(recipe.classes), threshold=threshold)
        metrics["n_patients"] = int(part["patient_id"].nunique())
        metrics["per_source"] = {
            str(source): {"n": int(len(rows)), "positives": int((rows["target"] > 0).sum())} for source, rows in part.groupby("source")
        }
        out[str(split)] = metrics
    return out


#: metrics.json's per-split metrics of a predictions frame (also used by `covidcxr.adapt` for runs it writes).
split_metrics = _split_metrics


def _calibrate_and_choose(recipe: TrainRecipe, records: pd.DataFrame, deployed: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[OperatingPoint, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The operating point from the deployed model's validation predictions (temperature first, if asked).

    Returns:
        ``(point, deployed)``: with ``calibrate: temperature`` the probabilities of every
        split are replaced by the calibrated ones (``sigmoid(logit / T)``).
    """
    from covidcxr.train.operating_point import choose_operating_point

    binary = recipe.num_outputs == 1
    spec = recipe.operating_point
    temperature = None
    if spec.calibrate == "temperature" and "val" in deployed:
        from covidcxr.evaluate.calibration import apply_temperature, fit_temperature

        rows, _, logits = deployed["val"]
        targets = records.iloc[rows]["target"].to_numpy()
        if len(np.unique(targets)) < 2:
            raise CovidCXRError(
                f"operating_point.calibrate: a temperature is fitted on validation images of more than one class; the validation split has "
                f"only class {sorted(set(targets.tolist()))} ({len(targets)} images): enlarge data.split.val_size, or use calibrate none"
            )
        flat = (lambda z: z.reshape(-1)) if binary else (lambda z: z)  # noqa: E731 - binary logits (N, 1) -> (N,)
        temperature = float(fit_temperature(flat(logits), targets.astype(np.int64)))
        deployed = {s: (r, apply_temperature(flat(z), temperature), z) for s, (r, _, z) in deployed.items()}
    if not binary:
        return OperatingPoint(threshold=None, rule="argmax", chosen_on="nothing", temperature=temperature), deployed
    if "val" not in deployed:
        return OperatingPoint(threshold=spec.target, rule="fixed", value=spec.target, chosen_on="the recipe (no validation split)"), deployed
    rows, probability, _ = deployed["val"]
    part = records.iloc[rows]
    point = choose_operating_point(spec, part["target"].to_numpy(), probability.reshape(-1), part["patient_id"].astype(str).to_numpy(), temperature, seed=recipe.seed)
    return point, deployed


def check_tracking(recipe: TrainRecipe) -> None:
    """Refuse, before anything is trained, a recipe asking for TensorBoard or MLflow when the package is absent.

    Raises:
        CovidCXRError: naming the field and the extra that installs it (``covidcxr[tracking]``).
    """
    for package, wanted in (("tensorboard", recipe.output.tensorboard), ("mlflow", recipe.output.mlflow is not None)):
        if wanted and importlib.util.find_spec(package) is None:
            raise CovidCXRError(
                f"output.{package}: logging to {package} needs the '{package}' package, which is not installed; "
                f"pip install 'covidcxr[tracking]', or turn output.{package} off"
            )


def _loggers(recipe: TrainRecipe, run_dir: Path) -> list[Any]:
    """Lightning loggers: CSV into ``RUN/lightning_logs/`` always, TensorBoard and MLflow when the recipe asks.

    ``train_log.csv`` (`TrainLogCallback`) stays the run's own per-epoch table; these carry
    the same numbers to the tools researchers already use. A resumed run appends to the
    same CSV and TensorBoard folder and starts a new MLflow run (named after the folder).

    Raises:
        CovidCXRError: TensorBoard or MLflow requested but not installed.
    """
    check_tracking(recipe)
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="lightning_logs", version="")]
    if recipe.output.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    if recipe.output.mlflow is not None:
        try:
            loggers.append(MLFlowLogger(experiment_name=recipe.name or run_dir.name, run_name=run_dir.name, tracking_uri=recipe.output.mlflow))
        except Exception as exc:  # noqa: BLE001 - MLflow's own refusal (a bad URI, a file store it no longer accepts)
            raise CovidCXRError(f"output.mlflow: MLflow cannot use tracking URI {recipe.output.mlflow!r}: {exc}") from None
    return loggers


def _keep_checkpoints(result: RunResult, keep: str, say: Callable[[str], None]) -> None:
    """Apply ``output.keep`` to a finished run (each fold of a k-fold run): `keep_checkpoints`."""
    from covidcxr.train.callbacks import keep_checkpoints

    for run in result.folds or [result]:
        removed = keep_checkpoints(run.run_dir, keep)  # type: ignore[arg-type]
        if removed:
            say(f"output.keep={keep}: removed {', '.join(p.name for p in removed)} from {run.run_dir}")


def _callbacks(recipe: TrainRecipe, rd: RunDir, extra_callbacks: Sequence[Any]) -> tuple[list[Any], Any]:
    """The run's callbacks — train log, snapshots, early stopping, best/last checkpoints — and the best-checkpoint one."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from covidcxr.train.callbacks import SnapshotCallback, TrainLogCallback

    monitor = recipe.train.monitor
    callbacks: list[Any] = [TrainLogCallback(rd.train_log)]
    if recipe.snapshots.count:
        callbacks.append(SnapshotCallback(recipe.snapshots, rd.checkpoints, recipe.train.epochs))
    if recipe.early_stopping.enabled:
        es_monitor = recipe.early_stopping.monitor or (monitor if monitor != "none" else "val_loss")
        callbacks.append(
            EarlyStopping(
                monitor=es_monitor,
                mode="min" if es_monitor == "val_loss" else "max",
                patience=recipe.early_stopping.patience,
                min_delta=recipe.early_stopping.min_delta,
                check_finite=False,
            )
        )
    best_cb = ModelCheckpoint(
        dirpath=rd.checkpoints,
        filename="best",
        save_weights_only=True,  # the model only: the optimizer state lives in last.ckpt
        monitor=None if monitor == "none" else monitor,
        mode="min" if monitor == "val_loss" else "max",
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    callbacks.append(best_cb)
    callbacks.append(ModelCheckpoint(dirpath=rd.checkpoints, filename="last", save_top_k=1, enable_version_counter=False, every_n_epochs=1))
    if recipe.train.checkpoint_every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=rd.checkpoints,
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
                every_n_train_steps=recipe.train.checkpoint_every_n_steps,
                save_on_train_epoch_end=False,
            )
        )
    callbacks.extend(extra_callbacks)
    return callbacks, best_cb


def _trainer(recipe: TrainRecipe, run_dir: Path, callbacks: list[Any], progress: bool) -> tuple[Any, dict[str, Any]]:
    """The Lightning trainer of the recipe's engine (`resolve_engine`), and that engine; a bad engine is a `CovidCXRError`."""
    import logging

    import lightning as L

    from covidcxr.train.callbacks import AtomicCheckpointIO

    engine = resolve_engine(recipe)
    # Lightning's own banner (GPU/TPU availability, tips) repeats what `_train_one` says.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        MisconfigurationException = ValueError  # type: ignore[assignment,misc]
    try:
        trainer = L.Trainer(
            **engine,
            max_epochs=recipe.train.epochs,
            callbacks=callbacks,
            logger=_loggers(recipe, run_dir),
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            enable_progress_bar=progress and recipe.engine.progress_bar,
            enable_model_summary=False,
            accumulate_grad_batches=recipe.train.accumulate_grad_batches,
            gradient_clip_val=recipe.train.gradient_clip_val,
            log_every_n_steps=10,
            default_root_dir=str(run_dir),
        )
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        raise CovidCXRError(f"engine: {exc}") from None
    return trainer, engine


def _model_module(recipe: TrainRecipe, run_dir: Path, resume: bool, say: Callable[[str], None], progress: bool) -> Any:
    """The Lightning module with its provenance: resumed from ``last.ckpt``'s, or initialised from the recipe's pretrained weights."""
    from covidcxr.train.module import CXRClassifierModule

    provenance: dict[str, Any] = {
        "run": recipe.name,
        "config_hash": recipe.config_hash(),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    module = CXRClassifierModule(recipe.resolved(), provenance=provenance)
    if resume:
        last = RunDir(run_dir).last_checkpoint
        info = read_provenance(last)
        provenance["pretrained"] = info.get("pretrained")
        say(f"resuming {run_dir} from {last} (epoch {info.get('epoch')}, global step {info.get('global_step')})")
    else:
        provenance["pretrained"] = initialize_pretrained(module.model, recipe, say=say, progress=progress)
    module.provenance = provenance
    return module


def _split_predictions(recipe: TrainRecipe, rd: RunDir, trainer: Any, module: Any, datamodule: Any) -> tuple[Path, dict[str, Any], dict[str, Any] | None, list[Path]]:
    """Validation/test predictions of ``best.ckpt`` (``last.ckpt`` without one) and of the snapshot ensemble, if any.

    Returns:
        ``(best checkpoint, its predictions, the ensemble's or None, the snapshot files)``.
    """
    best = rd.best_checkpoint if rd.best_checkpoint.is_file() else rd.last_checkpoint
    splits = [s for s in ("val", "test") if s in datamodule.datasets]
    with warnings.catch_warnings():
        _quiet_lightning_warnings()
        from_best = _predict(trainer, module, datamodule, best, splits) if splits else {}
        snapshot_files: list[Path] = []
        ensemble = None
        if recipe.snapshots.count:
            snapshot_files = rd.snapshot_checkpoints()
            if snapshot_files and splits:
                runs = [_predict(trainer, module, datamodule, path, splits) for path in snapshot_files]
                ensemble = _ensemble(runs, recipe.num_outputs == 1)
    return best, from_best, ensemble, snapshot_files


def _data_counts(recipe: TrainRecipe, records: pd.DataFrame, excluded: pd.DataFrame, rejected: Sequence[Any]) -> dict[str, Any]:
    """``n_images``, ``n_patients``, ``class_counts`` per split and ``excluded`` of ``metrics.json``."""
    splits = ("train", "val", "test")
    return {
        "n_images": {s: int((records["split"] == s).sum()) for s in splits},
        "n_patients": {s: int(records.loc[records["split"] == s, "patient_id"].nunique()) for s in splits},
        "class_counts": {s: {c: int(((records["split"] == s) & (records["class_name"] == c)).sum()) for c in recipe.classes} for s in splits},
        "excluded": {
            "count": int(len(excluded) + len(rejected)),
            "by_reason": {str(k): int(v) for k, v in excluded["reason"].value_counts().items()} if len(excluded) else {},
            "adapter_or_split": len(rejected),
        },
    }


def _snapshot_metrics(recipe: TrainRecipe, callbacks: list[Any], snapshot_files: list[Path], ensemble: Any, predictions: pd.DataFrame, threshold: float) -> dict[str, Any]:
    """``metrics.json``'s ``snapshots`` block: what was taken, and the ensemble vs ``best.ckpt`` alone."""
    from covidcxr.train.callbacks import SnapshotCallback

    snapshot_cb = next((c for c in callbacks if isinstance(c, SnapshotCallback)), None)
    out: dict[str, Any] = {
        "requested": recipe.snapshots.count,
        "taken": [{"k": k, "epoch": e} for k, e in (snapshot_cb.taken if snapshot_cb else [])],
        "files": [p.name for p in snapshot_files],
    }
    if ensemble is not None:
        out["ensemble"] = _split_metrics(recipe, predictions, "probability", threshold)
        if recipe.num_outputs == 1:
            out["best_checkpoint"] = _split_metrics(recipe, predictions, "probability_best", threshold)
        out["predictions"] = (
            "probability = the ensemble's average (the deployed model; calibrated when operating_point.calibrate is set); "
            "probability_best = best.ckpt alone, uncalibrated"
        )
    return out


def _train_one(recipe: TrainRecipe, run_dir: Path, force_new: bool, progress: bool, say: Callable[[str], None], extra_callbacks: Sequence[Any]) -> RunResult:
    """Train one run (or resume it), then predict, choose the operating point and write ``metrics.json``."""
    import lightning as L

    from covidcxr.train.callbacks import TrainLogCallback
    from covidcxr.train.data import CXRDataModule, build_records

    started = time.perf_counter()
    run_dir = run_dir.resolve()
    recipe = recipe.with_updates({"output.run_dir": str(run_dir), "name": recipe.name or run_dir.name})
    state = _existing_state(recipe, run_dir, force_new, say)
    rd = RunDir(run_dir)
    if state == "finished":
        metrics = _read_json(rd.metrics) or {}
        say(f"{run_dir}: finished already (config {recipe.config_hash()[:12]}, {metrics.get('epochs_trained')} epochs); not retrained")
        return RunResult(run_dir, "finished", metrics)
    resume = state == "resume"
    hollow = check_not_hollow(recipe)
    if recipe.engine.threads:
        torch.set_num_threads(recipe.engine.threads)
    L.seed_everything(recipe.seed, workers=True, verbose=False)

    records, notes, rejected = build_records(recipe)
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        rd.write_config(recipe)
    module = _model_module(recipe, run_dir, resume, say, progress)
    datamodule = CXRDataModule(recipe, records, on_prepared=lambda prepared: _write_prepared(run_dir, prepared, notes, rejected), progress=progress)
    callbacks, best_cb = _callbacks(recipe, rd, extra_callbacks)
    trainer, engine = _trainer(recipe, run_dir, callbacks, progress)
    say(
        f"training {recipe.model.name} on {recipe.data.task} {list(recipe.classes)}: {engine['accelerator']} x "
        f"{trainer.num_devices} device(s), precision {engine['precision']}, channels_last={recipe.engine.channels_last}"
    )
    with warnings.catch_warnings():
        _quiet_lightning_warnings()
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(rd.last_checkpoint) if resume else None, weights_only=True)
    if trainer.interrupted:
        return RunResult(run_dir, "interrupted")

    best, from_best, ensemble, snapshot_files = _split_predictions(recipe, rd, trainer, module, datamodule)
    if not trainer.is_global_zero:
        return RunResult(run_dir, "resumed" if resume else "trained")
    # The deployed model is the evaluated one: the ensemble when there is one (`RunDir.weights`).
    records_used = datamodule.prepared.records
    point, deployed = _calibrate_and_choose(recipe, records_used, ensemble or from_best)
    threshold = 0.5 if point.threshold is None else float(point.threshold)
    predictions = _prediction_frame(recipe, records_used, deployed, from_best if ensemble else None, threshold) if from_best else pd.DataFrame()
    if len(predictions):
        rd.write_predictions(predictions)
    rd.write_operating_point(point)
    say(f"operating point: {point.describe()}")
    log_rows = next((c.rows for c in callbacks if isinstance(c, TrainLogCallback)), [])
    speeds = [r["train_images_per_second"] for r in log_rows if r.get("train_images_per_second")]
    best_info = read_provenance(best) if best.is_file() else {}
    provenance = module.provenance
    metrics: dict[str, Any] = {
        "run": recipe.name,
        "status": "complete",
        "task": recipe.data.task,
        "classes": list(recipe.classes),
        "model": recipe.model.name,
        "config_hash": recipe.config_hash(),
        "manifest_hash": provenance.get("manifest_hash"),
        "split_ids": provenance.get("split_ids"),
        "code_version": provenance["code_version"],
        "pretrained": provenance.get("pretrained"),
        "epochs_requested": recipe.train.epochs,
        "epochs_trained": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "stopped_early": bool(recipe.early_stopping.enabled and trainer.current_epoch < recipe.train.epochs),
        "monitor": recipe.train.monitor,
        "best_epoch": best_info.get("epoch"),
        "best_score": None if best_cb.best_model_score is None else float(best_cb.best_model_score),
        "engine": {**engine, "num_devices": trainer.num_devices, "world_size": trainer.world_size, "channels_last": recipe.engine.channels_last, "threads": torch.get_num_threads()},
        "train_images_per_second": round(float(np.median(speeds)), 2) if speeds else None,
        "wall_seconds_this_session": round(time.perf_counter() - started, 2),
        "resumed": resume,
        **_data_counts(recipe, records_used, datamodule.prepared.excluded, rejected),
        "notes": notes,
        "threshold": point.threshold,
        "operating_point": point.to_dict(),
        "weights": {"kind": "snapshot_ensemble" if ensemble is not None else "checkpoint", "checkpoints": [p.name for p in (snapshot_files if ensemble is not None else [best])]},
        "warnings": list(hollow),
    }
    # val/test metrics of the deployed model at its operating point
    metrics.update(_split_metrics(recipe, predictions, "probability", threshold) if len(predictions) else {})
    if recipe.snapshots.count:
        metrics["snapshots"] = _snapshot_metrics(recipe, callbacks, snapshot_files, ensemble, predictions, threshold)
    rd.write_metrics(metrics)
    return RunResult(run_dir, "resumed" if resume else "trained", metrics)


# ---------------------------------------------------------------------------------- k-fold


def _kfold_operating_point(recipe: TrainRecipe, folds: Sequence[RunResult], pooled_val: pd.DataFrame) -> OperatingPoint:
    """A k-fold root's threshold for its pooled out-of-fold predictions.

    Each fold's model keeps its own operating point (``fold-k/operating_point.json``,
    chosen on that fold's validation split). The pooled out-of-fold test predictions
    come from k models, so the root applies the same rule to the pooled validation
    predictions of the k folds (never a test image), and lists the folds' own points.
    """
    from covidcxr.train.operating_point import choose_operating_point

    per_fold = [{"fold": k, **RunDir(f.run_dir).operating_point().to_dict()} for k, f in enumerate(folds)]
    if recipe.num_outputs != 1:
        return OperatingPoint(threshold=None, rule="argmax", chosen_on="nothing", per_fold=per_fold)
    spec = recipe.operating_point
    if not len(pooled_val):
        return OperatingPoint(threshold=spec.target, rule="fixed", value=spec.target, chosen_on="the recipe (no validation split)", per_fold=per_fold)
    point = choose_operating_point(
        spec,
        pooled_val["target"].to_numpy(),
        pooled_val["probability"].to_numpy(),
        pooled_val["patient_id"].astype(str).to_numpy(),
        seed=recipe.seed,
        chosen_on=f"the pooled validation splits of {len(folds)} folds",
    )
    return OperatingPoint(**{**point.__dict__, "per_fold": per_fold})


def _train_kfold(recipe: TrainRecipe, run_dir: Path, force_new: bool, progress: bool, say: Callable[[str], None], extra_callbacks: Sequence[Any]) -> RunResult:
    run_dir = run_dir.resolve()
    recipe = recipe.with_updates({"output.run_dir": str(run_dir), "name": recipe.name or run_dir.name})
    rd = RunDir(run_dir)
    config = rd.config
    if config.is_file():
        try:
            previous = load_recipe(config).config_hash()
        except CovidCXRError:
            previous = "unreadable"
        if previous != recipe.config_hash():
            if not force_new:
                raise RunConflictError(
                    f"run directory {run_dir} holds another k-fold experiment (config hash {previous[:12]}, this recipe "
                    f"{recipe.config_hash()[:12]}); choose another --run-dir, or --force-new"
                )
            _move_aside(run_dir, say)
        elif force_new:
            _move_aside(run_dir, say)
    elif force_new and run_dir.exists():
        _move_aside(run_dir, say)
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        rd.write_config(recipe)
    folds = []
    for k in range(recipe.data.split.folds):
        fold_recipe = recipe.with_updates(
            {"data.split.fold": k, "name": f"{recipe.name}-fold-{k}", "output.run_dir": str(rd.fold(k).path)}
        )
        say(f"fold {k + 1}/{recipe.data.split.folds} -> {rd.fold(k).path}")
        folds.append(_train_one(fold_recipe, rd.fold(k).path, False, progress, say, extra_callbacks))
    if not _is_rank_zero():
        return RunResult(run_dir, "trained", folds=folds)
    frames, val_frames = [], []
    for k, fold in enumerate(folds):
        path = RunDir(fold.run_dir).predictions
        if path.is_file():
            frame = pd.read_parquet(path)
            val_frames.append(frame[frame["split"] == "val"])
            frame = frame[frame["split"] == "test"].copy()
            frame["fold"] = k
            frames.append(frame)
    pooled = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    pooled["run"] = recipe.name
    point = _kfold_operating_point(recipe, folds, pd.concat(val_frames, ignore_index=True) if val_frames else pd.DataFrame())
    threshold = 0.5 if point.threshold is None else float(point.threshold)
    if len(pooled) and recipe.num_outputs == 1:
        pooled["predicted"] = (pooled["probability"] >= threshold).astype(np.int64)
    if len(pooled):
        rd.write_predictions(pooled)
    rd.write_operating_point(point)
    per_fold = [fold.metrics.get("test", {}) for fold in folds]
    aucs = [m.get("auc") for m in per_fold if m.get("auc") is not None]
    metrics = {
        "run": recipe.name,
        "status": "complete",
        "kind": "kfold",
        "folds": recipe.data.split.folds,
        "task": recipe.data.task,
        "classes": list(recipe.classes),
        "config_hash": recipe.config_hash(),
        "epochs_requested": recipe.train.epochs,
        "threshold": point.threshold,
        "operating_point": point.to_dict(),
        "warnings": list({w["id"]: w for fold in folds for w in fold.metrics.get("warnings") or []}.values()),
        "out_of_fold": _split_metrics(recipe, pooled.assign(split="test"), threshold=threshold).get("test", {}) if len(pooled) else {},
        "per_fold_test_auc": [m.get("auc") for m in per_fold],
        "test_auc_mean": float(np.mean(aucs)) if aucs else None,
        "test_auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
        "fold_dirs": [str(f.run_dir) for f in folds],
    }
    rd.write_metrics(metrics)
    status = "finished" if all(f.status == "finished" for f in folds) else "trained"
    return RunResult(run_dir, status, metrics, folds)


# ---------------------------------------------------------------------------------- entry point


def train_recipe(
    recipe: TrainRecipe,
    run_dir: str | Path | None = None,
    force_new: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    extra_callbacks: Sequence[Any] = (),
) -> RunResult:
    """Train a recipe into its run directory (resuming or skipping as the directory says).

    Args:
        recipe: a validated `TrainRecipe` (`load_recipe`).
        run_dir: overrides ``output.run_dir`` / ``output.runs_dir/<name>``.
        force_new: move an existing run directory aside and start over.
        progress: progress bars (preprocessing and Lightning's).
        say: where one-line status messages go (default: print).
        extra_callbacks: more Lightning callbacks (tests use them to interrupt a run).

    Returns:
        A `RunResult`; ``metrics`` is what ``metrics.json`` holds.

    Raises:
        RunConflictError: the run directory holds another experiment.
        FolderLocked: another live process is writing into the run directory (the error says
            which: pid, host, command, since when).
        CovidCXRError: bad data, a bad engine setting, weights that do not fit...
    """
    speak = say or _say_default
    say = lambda message: speak(message) if _is_rank_zero() else None  # noqa: E731 - one voice under DDP
    target = Path(run_dir) if run_dir is not None else recipe.run_dir()
    check_not_hollow(recipe)  # before anything is written or preprocessed
    check_tracking(recipe)
    from covidcxr.io.lock import RunLock
    from covidcxr.train.callbacks import clean_partial_checkpoints

    # One writer per run folder (a second one is told who holds it); DDP's other ranks share rank 0's lock.
    with RunLock(target) if _is_rank_zero() else contextlib.nullcontext():
        for stale in clean_partial_checkpoints(target) if _is_rank_zero() else []:
            say(f"removed {stale}, a partial checkpoint left by an interrupted run")
        if recipe.data.split.kind == "kfold" and recipe.data.split.fold is None:
            result = _train_kfold(recipe, target, force_new, progress, say, extra_callbacks)
        else:
            result = _train_one(recipe, target, force_new, progress, say, extra_callbacks)
        if _is_rank_zero() and result.metrics.get("status") == "complete":
            _keep_checkpoints(result, recipe.output.keep, say)
            _write_reference(result.run_dir, progress, say)
            _write_seen_fingerprints(result.run_dir, progress, say)
        return result


def _write_seen_fingerprints(run_dir: Path, progress: bool, say: Callable[[str], None]) -> None:
    """Fingerprints of the train/val images (`covidcxr.evaluate.seen_prints`): near-duplicates of them stay findable where the images are not."""
    from covidcxr.evaluate.seen_prints import write_seen_fingerprints

    try:
        counts = write_seen_fingerprints(run_dir, progress=progress)
    except CovidCXRError as exc:
        say(f"fingerprints of the training images not stored ({exc}); `evaluate --data` will need the images themselves")
        return
    if counts["unreadable"]:
        say(f"{counts['unreadable']} training/validation images could not be fingerprinted; near-duplicates of them are found only where they can be read")


def _write_reference(run_dir: Path, progress: bool, say: Callable[[str], None]) -> None:
    """The out-of-distribution reference predict/serve read, built once here rather than at the first request."""
    from covidcxr.serve.reference import write_run_reference

    if RunDir(run_dir).is_kfold_root:
        return  # not one model: a fold named to predict/serve builds its reference at its first load
    try:
        write_run_reference(run_dir, progress=progress, say=say)
    except CovidCXRError as exc:
        say(f"out-of-distribution reference not written ({exc}); predict and serve will report the check as unavailable")
