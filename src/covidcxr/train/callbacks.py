"""Lightning plumbing of a run: atomic checkpoint files, the epoch log, snapshot ensembles.

* `AtomicCheckpointIO`: every checkpoint is written to a temporary file beside its
  target, fsynced and moved onto it (`covidcxr.io.atomic_path`), so a run killed (or a
  machine losing power) while saving leaves the previous ``last.ckpt`` intact, never a
  truncated or empty one; `clean_partial_checkpoints` removes the temporary files such a
  kill leaves behind.
* `TrainLogCallback`: ``train_log.csv``, one row per epoch (losses, validation metrics,
  learning rate, images/s); its rows travel inside the checkpoints, so a resumed run's log
  is exactly that of the checkpoint it resumed from, continued.
* `SnapshotCallback`: Hall et al. (2020)'s snapshot ensemble: ``count`` checkpoints
  ``gap_epochs`` apart, from the first epoch whose metric passes a threshold (or the
  last epochs), saved weights-only as ``snapshot-<k>.ckpt``.
* `keep_checkpoints`: the ``output.keep`` policy, applied once a run is finished.

**What each checkpoint holds.** ``best.ckpt`` and ``snapshot-<k>.ckpt`` are weights-only
(Lightning's ``save_weights_only``: the network, the loop counters, the hyper-parameters and
the run's provenance — no optimizer, scheduler or callback state); only ``last.ckpt``
carries what a resume needs (Adam's two moment buffers double the size of the weights).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text, clean_stale_temps
from covidcxr.rundir import RunDir
from covidcxr.train.recipe import SnapshotSection

__all__ = ["AtomicCheckpointIO", "SnapshotCallback", "TrainLogCallback", "clean_partial_checkpoints", "keep_checkpoints"]

Keep = Literal["all", "best", "last"]

LOG_COLUMNS = (
    "epoch",
    "global_step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_auc",
    "val_accuracy",
    "val_balanced_accuracy",
    "lr",
    "epoch_seconds",
    "train_images_per_second",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)


def clean_partial_checkpoints(run_dir: str | Path, folder: str = "checkpoints") -> list[Path]:
    """Remove the checkpoint temporaries a killed run left in ``run_dir/checkpoints`` (and ``fold-*/checkpoints``).

    Call it only while holding the run's lock (`covidcxr.io.lock.RunLock`): then no other
    process can be writing one of them.
    """
    run_dir = Path(run_dir)
    removed: list[Path] = []
    for checkpoints in (run_dir / folder, *sorted(run_dir.glob(f"fold-*/{folder}"))):
        removed += clean_stale_temps(checkpoints)
    return removed


class TrainLogCallback(L.Callback):
    """Write ``train_log.csv`` (atomically, whole file) at the end of every training epoch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._epoch_start: float | None = None
        self._images = 0

    @property
    def state_key(self) -> str:
        return "TrainLogCallback"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._images = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._epoch_start is None:  # resumed in the middle of an epoch: time this session's part
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += int(batch[1].shape[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - (self._epoch_start or time.perf_counter())
        self._epoch_start = None
        stats = pl_module.epoch_train_stats() if hasattr(pl_module, "epoch_train_stats") else {}
        val = dict(getattr(pl_module, "last_val_metrics", {}) or {})
        lr = None
        if trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        row = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            **stats,
            **{k: val.get(k) for k in ("val_loss", "val_auc", "val_accuracy", "val_balanced_accuracy")},
            "lr": lr,
            "epoch_seconds": round(seconds, 3),
            # images this process trained on, over this session's part of the epoch
            "train_images_per_second": round(self._images * trainer.world_size / seconds, 2) if seconds > 0 else None,
        }
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
        atomic_write_text(self.path, buffer.getvalue())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


class SnapshotCallback(L.Callback):
    """Save snapshot checkpoints for an averaged ensemble (Hall et al. 2020, §3).

    ``start="threshold"``: once ``metric`` exceeds ``threshold`` at an epoch >=
    ``start_epoch`` (Hall: validation accuracy > 0.8), that epoch and every
    ``gap_epochs``-th after it give a snapshot, until ``count`` are taken.
    ``start="last"``: the epochs ``max_epochs - 1 - k * gap_epochs`` for ``k < count``.

    Attributes:
        started_at: the epoch of the first snapshot (None before the threshold is met).
        taken: ``[(k, epoch), ...]`` snapshots written so far.
    """

    def __init__(self, spec: SnapshotSection, dirpath: str | Path, max_epochs: int) -> None:
        self.spec = spec
        self.dirpath = Path(dirpath)
        self.max_epochs = int(max_epochs)
        self.started_at: int | None = None
        self.taken: list[list[int]] = []

    @property
    def state_key(self) -> str:
        return "SnapshotCallback"

    def path(self, k: int) -> Path:
        return self.dirpath / f"snapshot-{k}.ckpt"

    def _metric(self, pl_module: L.LightningModule) -> float | None:
        if self.spec.metric == "train_accuracy":
            return pl_module.epoch_train_stats().get("train_accuracy")  # type: ignore[operator]
        value = (getattr(pl_module, "last_val_metrics", {}) or {}).get(self.spec.metric)
        return None if value is None else float(value)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        spec, epoch = self.spec, int(trainer.current_epoch)
        if len(self.taken) >= spec.count or any(e == epoch for _, e in self.taken):
            return
        if spec.start == "last":
            wanted = {self.max_epochs - 1 - k * spec.gap_epochs for k in range(spec.count)}
            due = epoch in wanted
        else:
            if self.started_at is None and epoch >= spec.start_epoch:
                value = self._metric(pl_module)
                if value is not None and value > spec.threshold:
                    self.started_at = epoch
            due = self.started_at is not None and (epoch - self.started_at) % spec.gap_epochs == 0
        if due:
            k = len(self.taken)
            self.taken.append([k, epoch])
            trainer.save_checkpoint(self.path(k), weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "taken": [list(t) for t in self.taken]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started_at = state_dict.get("started_at")
        self.taken = [list(t) for t in state_dict.get("taken", [])]


def keep_checkpoints(run_dir: str | Path, keep: Keep) -> list[Path]:
    """Apply the ``output.keep`` policy to a *finished* run's ``checkpoints/``; returns the files removed.

    * ``all``: nothing is removed.
    * ``best``: ``last.ckpt`` goes (the optimizer state); ``best.ckpt`` and the snapshots — the
      run's model (`RunDir.weights`) — stay. The run can no longer be trained further.
    * ``last``: only ``last.ckpt`` stays; the run can be trained further (raise
      ``train.epochs``), but the model its metrics describe is gone (`load_run` says so).

    The policy is recorded in ``metrics.json`` (``checkpoints``: ``keep``, ``removed``) so a
    later attempt to train the run further is refused with the reason (`train_recipe`).

    Args:
        run_dir: one run directory (a k-fold run: one ``fold-k``).
        keep: ``all``, ``best`` or ``last``.

    Raises:
        CovidCXRError: the run is not finished (``metrics.json`` status is not ``complete``):
            its ``last.ckpt`` is still what a resume needs.

    Example:
        >>> keep_checkpoints("runs/grid/point-3", "best")          # doctest: +SKIP
        [PosixPath('runs/grid/point-3/checkpoints/last.ckpt')]
    """
    if keep not in ("all", "best", "last"):
        raise CovidCXRError(f"output.keep must be all, best or last; got {keep!r}")
    rd = RunDir(run_dir)
    metrics = rd.read_metrics() or {}
    if metrics.get("status") != "complete":
        raise CovidCXRError(f"run {rd.path} is not finished (metrics.json status {metrics.get('status')!r}): its checkpoints are kept until it is")
    if keep == "all":
        return []
    files = [rd.best_checkpoint, rd.last_checkpoint, *rd.snapshot_checkpoints()]
    kept = {rd.last_checkpoint} if keep == "last" else set(files) - {rd.last_checkpoint}
    removed = [path for path in files if path not in kept and path.is_file()]
    for path in removed:
        path.unlink()
    before = metrics.get("checkpoints") or {}
    metrics["checkpoints"] = {"keep": keep, "removed": sorted({*before.get("removed", []), *(p.name for p in removed)})}
    rd.write_metrics(metrics)
    return removed
