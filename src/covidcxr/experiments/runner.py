"""The grid runner: claim a run, train it, test it on every source, store the results; repeat.

`run_experiment` is one worker. Any number of workers (processes, machines) can run the
same experiment against one database: each claims a pending run in a transaction (see
`covidcxr.experiments.store`), so no two train the same run. A worker stops when no run is
pending; it waits while the runs left need a stage-1 run another worker is training.

What survives what:

* a rerun skips every ``done`` run (nothing is retrained or re-tested);
* a crash loses at most the run in progress: its row stays ``running`` until the heartbeat
  goes stale (or at once when the dead process was on this machine), then any worker
  reclaims it and `train_recipe` resumes from the run directory's ``last.ckpt``;
* Ctrl-C gives the run back (``pending``) before exiting;
* a failed run records its error (``covidcxr experiment status`` shows it) and the grid
  goes on; points that need a failed stage-1 run fail with that reason;
  ``--retry-failed`` puts failed runs back in the queue.

**Checkpoints kept** (``output.keep``, ``--keep``): a run is trained keeping every
checkpoint, and the policy is applied only once it is done — trained, tested and stored —
so a run that may still resume keeps its ``last.ckpt``. ``last`` never removes a model
another run of the grid starts from (a stage-1 run's, or a point's that has an adaptation
run): those keep everything (`_apply_keep`).

Each run scales out through Lightning: ``engine.devices`` / ``engine.num_nodes`` (the
``--devices`` / ``--num-nodes`` options). A run that needs more than one process is
trained in a child ``covidcxr train`` process, so Lightning's launcher re-executes that
command for the other ranks, not the whole grid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.errors import CovidCXRError
from covidcxr.experiments.recipe import AdaptRun, ExperimentRecipe, GridPoint, PretrainRun
from covidcxr.experiments.store import POOLED, ClaimedRun, Heartbeat, RunStore, Worker, metric_row
from covidcxr.io.atomic import atomic_write_text
from covidcxr.rundir import RunDir

__all__ = ["GridReport", "default_db_url", "ensure_subsets", "evaluate_point", "run_experiment"]


def default_db_url(experiment: ExperimentRecipe) -> str:
    """``sqlite:///<runs_dir>/experiments.sqlite`` (beside the experiment folders)."""
    return f"sqlite:///{experiment.root.parent / 'experiments.sqlite'}"


@dataclass
class GridReport:
    """What one worker did.

    Attributes:
        experiment: the experiment's label (``name@scale``).
        total: runs in the grid (stage-1 runs included).
        done_before: runs already done when this worker started.
        ran: keys this worker finished.
        failed: ``(key, error)`` this worker recorded.
        counts: the status counts when the worker stopped.
    """

    experiment: str
    total: int
    done_before: int
    ran: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def ensure_subsets(experiment: ExperimentRecipe) -> list[Path]:
    """Write the experiment's subset manifests that do not exist yet (`write_subset`)."""
    from covidcxr.experiments.testsets import write_subset

    experiment.points()  # expansion records which collections need a subset
    written = []
    subset = experiment.section.subset
    for target, collection in experiment.subsets.items():
        path = Path(target)
        if not path.is_file() and subset is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_subset(collection, path, subset.fraction, subset.min_images, subset.max_images, subset.seed)
            written.append(path)
    return written


def _needs_child_process(recipe: Any) -> bool:
    """True when the run's Lightning engine starts more than one process (DDP): train it in a child."""
    import torch

    engine = recipe.engine
    if engine.num_nodes > 1:
        return True
    devices = engine.devices
    if isinstance(devices, list):
        return len(devices) > 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return devices > 1 or devices == -1
    if devices == "auto":
        on_gpu = engine.accelerator in ("gpu", "cuda") or (engine.accelerator == "auto" and torch.cuda.is_available())
        return bool(on_gpu and torch.cuda.device_count() > 1)
    return False


def _train(recipe: Any, experiment: ExperimentRecipe, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume, or find finished) one run, keeping every checkpoint (`_apply_keep` prunes later); returns its metrics.json."""
    from covidcxr.train.run import train_recipe

    if recipe.output.keep != "all":
        recipe = recipe.with_updates({"output.keep": "all"})
    run_dir = recipe.run_dir()
    if _needs_child_process(recipe):
        recipe_file = experiment.root / ".recipes" / f"{run_dir.name}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recipe_file, recipe.to_yaml())
        command = [sys.executable, "-m", "covidcxr", "train", str(recipe_file), "--run-dir", str(run_dir), "--no-progress"]
        say(f"multi-process run: {' '.join(command)}")
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0:
            raise CovidCXRError(f"`covidcxr train` for {run_dir} exited with code {completed.returncode}")
        return RunDir(run_dir).read_metrics() or {}
    result = train_recipe(recipe, progress=progress, say=say)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    return result.metrics


def _apply_keep(target: GridPoint | PretrainRun | AdaptRun, targets: dict[str, Any], say: Callable[[str], None]) -> None:
    """Apply the run's ``output.keep`` once it is done (`covidcxr.train.callbacks.keep_checkpoints`).

    ``last`` would remove the model that a stage-1 run's points, or a point's adaptation
    run, start from: such a run keeps every checkpoint (and says so).
    """
    from covidcxr.train.callbacks import keep_checkpoints

    keep = target.recipe.output.keep
    started_from = isinstance(target, PretrainRun) or f"{target.key}/adapt" in targets
    if keep == "last" and started_from:
        say(f"output.keep=last: {target.key} keeps every checkpoint (other runs of the grid start from its model)")
        return
    run = RunDir(target.recipe.run_dir())
    for fold in run.folds() or [run]:
        try:
            removed = keep_checkpoints(fold.path, keep)
        except CovidCXRError as exc:  # the run is stored as done; a policy that cannot apply is said, not a failure
            say(f"output.keep={keep}: {exc}")
            continue
        if removed:
            say(f"output.keep={keep}: removed {', '.join(p.name for p in removed)} from {fold.path}")


def evaluate_point(point: GridPoint, test_sources: str | list[str], threshold: float | None = None, n_boot: int = 1000, progress: bool = False) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    """Test a trained point on every source (`covidcxr.experiments.testsets`).

    ``threshold`` None: the run's own operating point (`covidcxr.rundir.RunDir.threshold`).

    Returns:
        ``(metric rows without run_id, scored predictions, summary)``: one metric row per
        test source plus ``(seen)``, ``(unseen)``, ``(all)``; the summary holds the
        DeLong AUC gap, the accuracy gap, and per source the images linked out and rejected.
    """
    from covidcxr.experiments.testsets import pooled_metrics, predict_images, source_metrics, test_images

    run_dir = point.run_dir
    threshold = RunDir(run_dir).threshold if threshold is None else threshold
    pretrain_dir = point.pretrain.run_dir if point.pretrain is not None else None
    rows = test_images(point.recipe, run_dir, pretrain_dir, test_sources)
    scored, rejected = predict_images(run_dir, rows, progress=progress)
    classes = list(point.recipe.classes)
    per_source = source_metrics(scored, threshold=threshold, n_boot=n_boot, seed=point.recipe.seed, classes=classes)
    pooled = pooled_metrics(scored, threshold=threshold, n_boot=n_boot, seed=point.recipe.seed, classes=classes)
    metric_rows = []
    for source in dict.fromkeys(rows["source"].astype(str)):
        metrics = per_source.get(source)
        seen = bool(rows.loc[rows["source"].astype(str) == source, "seen"].iloc[0])
        metric_rows.append(metric_row(0, source, "source", metrics, seen))
    for scope, name in POOLED.items():
        metric_rows.append(metric_row(0, name, scope, pooled.get(scope), None))
    linked = rows.groupby("source")["linked_out"].first().to_dict() if len(rows) else {}
    summary = {
        "seen_sources": pooled["seen_sources"],
        "unseen_sources": pooled["unseen_sources"],
        "auc_gap": pooled["gap"],
        "accuracy_gap": pooled["accuracy_gap"],
        "linked_out": {str(k): int(v) for k, v in linked.items()},
        "rejected": {str(k): int(v) for k, v in rejected["source"].value_counts().items()} if len(rejected) else {},
        "n_test_images": int(len(scored)),
        "threshold": threshold,
        "n_boot": n_boot,
        "rule": "seen: the run's test split; unseen: every task image; both minus images linked (patient, dup_group, sha1, path) to the run's or its stage-1 run's train/val images",
    }
    return metric_rows, scored, summary


def evaluate_adaptation(adapt: AdaptRun, threshold: float | None = None, n_boot: int = 1000, progress: bool = False) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    """Score the adaptation test images with the point (before) and the adapted model (after).

    Returns:
        ``(metric rows of the adapted model per source and pooled, its scored predictions,
        summary)``; the summary's ``adaptation`` is `before_after` (Table 4 of Ben Ahmed et
        al.: accuracy per class and source before/after, McNemar, DeLong) and ``before`` the
        point's metrics on the same images.
    """
    from covidcxr.data.manifest import read_manifest
    from covidcxr.experiments.testsets import before_after, pooled_metrics, predict_images, source_metrics
    from covidcxr.train.data import select_task

    manifest = read_manifest(adapt.manifest_path)
    rows, _ = select_task(manifest, adapt.recipe)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    test["seen"] = True  # after adaptation, these sources are in the (adaptation) training
    # None: each model at its own operating point (the point's before, the adapted run's after)
    before_threshold = RunDir(adapt.point.run_dir).threshold if threshold is None else threshold
    threshold = RunDir(adapt.run_dir).threshold if threshold is None else threshold
    before, _ = predict_images(adapt.point.run_dir, test, progress=progress)
    after, rejected = predict_images(adapt.run_dir, test, progress=progress)
    classes = list(adapt.recipe.classes)
    seed = adapt.recipe.seed
    per_source = source_metrics(after, threshold=threshold, n_boot=n_boot, seed=seed, classes=classes)
    pooled = pooled_metrics(after, threshold=threshold, n_boot=n_boot, seed=seed, classes=classes)
    metric_rows = [metric_row(0, source, "source", metrics, True) for source, metrics in per_source.items()]
    metric_rows += [metric_row(0, name, scope, pooled.get(scope), None) for scope, name in POOLED.items()]
    before_metrics = source_metrics(before.assign(seen=False), threshold=before_threshold, n_boot=n_boot, seed=seed, classes=classes)
    fit = rows[rows["split"].isin(["train", "val"])]
    summary = {
        "adaptation": before_after(before, after, (before_threshold, threshold)),
        "before": {source: {"auc": (m or {}).get("auc"), "accuracy": (m or {}).get("accuracy"), "n_images": (m or {}).get("n_images")} for source, m in before_metrics.items()},
        "after": {source: {"auc": (m or {}).get("auc"), "accuracy": (m or {}).get("accuracy"), "n_images": (m or {}).get("n_images")} for source, m in per_source.items()},
        "adaptation_images": {f"{s}/{c}": int(n) for (s, c), n in fit.groupby(["source", "class_name"]).size().items()},
        "rejected": {str(k): int(v) for k, v in rejected["source"].value_counts().items()} if len(rejected) else {},
        "n_test_images": int(len(after)),
        "threshold": threshold,
        "rule": "adaptation images: few images of unseen sources, none linked to the point's training; test: the rest of those sources, not linked to either",
    }
    return metric_rows, after, summary


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CovidCXRError):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def run_experiment(
    experiment: ExperimentRecipe,
    store: RunStore,
    worker: Worker | None = None,
    stale_after: float = 300.0,
    heartbeat_every: float = 30.0,
    poll_every: float = 5.0,
    max_runs: int | None = None,
    wait: bool = True,
    retry_failed: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> GridReport:
    """Work through an experiment's grid as one worker (see the module docstring).

    Args:
        experiment: the loaded recipe (`load_experiment`).
        store: the run store (SQLite file or PostgreSQL server).
        worker: who claims (default: ``host:pid``).
        stale_after: seconds without a heartbeat after which a ``running`` run is reclaimed.
        heartbeat_every: seconds between heartbeats (well below ``stale_after``).
        poll_every: seconds between looks while waiting for another worker's stage-1 run.
        max_runs: stop after this many runs (None: until nothing is pending).
        wait: wait for runs blocked on other workers (False: stop instead).
        retry_failed: put failed runs back in the queue first.
        progress: progress bars inside each run.
        say: where one-line messages go.

    Returns:
        A `GridReport`.
    """
    started = time.perf_counter()
    worker = worker or Worker.here()
    experiment_id, run_ids = store.register(experiment)
    if retry_failed:
        again = store.retry_failed(run_ids)
        if again:
            say(f"--retry-failed: {again} failed run(s) back in the queue")
    points = {p.key: p for p in experiment.points()}
    stage_ones = {r.key: r for r in experiment.pretrain_runs()}
    adapts = {a.key: a for a in experiment.adapt_runs()}
    counts = store.counts(run_ids)
    report = GridReport(experiment=experiment.label, total=len(run_ids), done_before=counts["done"])
    say(f"{experiment.label}: {len(run_ids)} runs ({len(stage_ones)} stage-1), {counts['done']} done, {counts['pending']} pending, "
        f"{counts['running']} running, {counts['failed']} failed; store {store.safe_url}; worker {worker.name}")
    for path in ensure_subsets(experiment):
        say(f"subset manifest written: {path}")
    while max_runs is None or len(report.ran) + len(report.failed) < max_runs:
        for key in store.release_dead_local(run_ids, worker):
            say(f"released {key}: its worker on this machine is gone")
        for key in store.fail_orphans(run_ids):
            say(f"failed: {key}: its stage-1 run failed")
        claimed = store.claim(run_ids, worker, stale_after=stale_after)
        if claimed is None:
            counts = store.counts(run_ids)
            if counts["pending"] == 0 or not wait:
                break
            time.sleep(poll_every)
            continue
        _run_one(experiment, store, worker, claimed, {**points, **stage_ones, **adapts}, heartbeat_every, progress, say, report)
    report.counts = store.counts(run_ids)
    report.seconds = time.perf_counter() - started
    return report


def _run_one(
    experiment: ExperimentRecipe,
    store: RunStore,
    worker: Worker,
    claimed: ClaimedRun,
    targets: dict[str, GridPoint | PretrainRun | AdaptRun],
    heartbeat_every: float,
    progress: bool,
    say: Callable[[str], None],
    report: GridReport,
) -> None:
    started = time.perf_counter()
    target = targets.get(claimed.key)
    attempt = f" (attempt {claimed.attempts})" if claimed.attempts > 1 else ""
    say(f"{claimed.key}{attempt} -> {claimed.run_dir}")

    def tell(message: str) -> None:
        say(f"  {message}")

    with Heartbeat(store, claimed.id, worker, every=heartbeat_every) as beat:
        try:
            if target is None or target.config_hash != claimed.config_hash:
                raise CovidCXRError(f"run {claimed.key} ({claimed.config_hash[:12]}) is not in this worker's expansion of the recipe")
            section = experiment.section
            if isinstance(target, AdaptRun) and not target.manifest_path.is_file():
                from covidcxr.experiments.testsets import write_adaptation_manifest

                fit = write_adaptation_manifest(target)
                tell(f"adaptation manifest {target.manifest_path}: {fit['split'].value_counts().to_dict()}")
            train_metrics = _train(target.recipe, experiment, progress, tell)
            metric_rows: list[dict[str, Any]] = []
            scored = None
            summary = None
            if isinstance(target, GridPoint):
                rows, scored, summary = evaluate_point(target, section.test_sources, section.threshold, section.n_boot, progress)
                metric_rows = [{**row, "run_id": claimed.id} for row in rows]
                tell(_one_line(rows))
            elif isinstance(target, AdaptRun):
                rows, scored, summary = evaluate_adaptation(target, section.threshold, section.n_boot, progress)
                metric_rows = [{**row, "run_id": claimed.id} for row in rows]
                tell("before -> after: " + "; ".join(f"{r['source']} {r['class']} {r['before']:.2f} -> {r['after']:.2f}" for r in summary["adaptation"]["rows"]))
            seconds = time.perf_counter() - started
            if beat.lost or not store.finish(claimed.id, worker, train_metrics, metric_rows, scored, summary, seconds):
                say(f"{claimed.key}: another worker took this run over (stale heartbeat); its result is theirs")
                return
            report.ran.append(claimed.key)
            _apply_keep(target, targets, tell)
            say(f"  done in {seconds:.0f} s")
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C (Lightning turns it into SystemExit)
            store.release(claimed.id, worker)
            say(f"interrupted: {claimed.key} released; rerun to resume it from its last.ckpt")
            raise
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the grid goes on
            error = _error_text(exc)
            store.fail(claimed.id, worker, error, time.perf_counter() - started)
            report.failed.append((claimed.key, error))
            say(f"failed: {claimed.key}: {error.strip().splitlines()[-1]}")


def _one_line(rows: list[dict[str, Any]]) -> str:
    parts = []
    for row in rows:
        if row["scope"] != "source":
            continue
        tag = "seen" if row["seen"] else "unseen"
        auc = "-" if row["auc"] is None else f"{row['auc']:.2f}"
        parts.append(f"{row['test_source']}({tag}) AUC {auc} n={row['n_images']}")
    return "; ".join(parts)
