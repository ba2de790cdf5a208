"""Testing a grid run on every source: which images, the predictions, the metrics.

**The rule** (Tartaglione et al. 2020 §3.3, "testing on different datasets"; Ben Ahmed et
al. 2021, seen vs unseen sources). A run's *seen* sources are those of its train and
validation images. For each test source:

* seen source: the run's own test split of that source (patient-disjoint by construction);
* unseen source: every image of that source that fits the run's task;

and, in both cases, minus every image *linked* to an image the run or its stage-1
pretraining run trained or validated on: the same patient, the same near-duplicate group
(``dup_group``), the same file (``sha1``) or the same path. The pretraining run counts
because its encoder saw those films (e.g. an encoder pretrained on Kermany pneumonia is
tested on Kermany only with the patients it never saw). Images the preprocessing rejects
are left out and counted. So each source's test set is patient-disjoint from everything
the model learned from, and a source is never called unseen when the model saw it.

What a run saw comes from `covidcxr.rundir.RunDir.seen` (its train/val rows). Predictions
come from the run's model through `covidcxr.train.inference` (`load_run`, `cached_inputs`,
`LoadedRun.predict`: the run's own preprocessing through the shared cache); for a run whose
metrics come from its snapshot ensemble (Hall et al.) that model is the ensemble.
Metrics per source come from `covidcxr.evaluate.cross_source.metrics_for_rows`
(patient-bootstrap CIs), seen vs unseen from `seen_unseen` (DeLong gap).

Example:
    >>> frame = test_images(recipe, run_dir, pretrain_dir=None, sources="all")      # doctest: +SKIP
    >>> scored, rejected = predict_images(run_dir, frame)                           # doctest: +SKIP
    >>> table = source_metrics(scored, n_boot=200)                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.rundir import RunDir, linked_rows
from covidcxr.train.recipe import TASKS, TrainRecipe

__all__ = [
    "PREDICTION_COLUMNS",
    "before_after",
    "linked_to",
    "pooled_metrics",
    "positive_class",
    "predict_images",
    "source_metrics",
    "task_rows",
    "test_images",
    "write_adaptation_manifest",
    "write_subset",
]

#: the per-image columns the run store keeps (``probabilities``: JSON list for multi-class runs).
PREDICTION_COLUMNS = ("image", "source", "patient_id", "label", "class_name", "target", "positive", "probability", "probabilities", "seen")


def positive_class(recipe: TrainRecipe) -> str:
    """The class whose probability the table scores: ``covid`` when the task has it, else the positive class."""
    classes = TASKS[recipe.data.task]
    if "covid" in classes:
        return "covid"
    return classes[1] if len(classes) == 2 else classes[-1]


# ---------------------------------------------------------------------------------- data


def write_subset(collection: str | Path, target: str | Path, fraction: float = 1.0, min_images: int = 0, max_images: int | None = None, seed: int = 0) -> pd.DataFrame:
    """A patient-grouped subset of a collection, written as a manifest (atomically).

    For each (source, label) the quota is ``fraction`` of its images, raised to
    ``min_images`` and capped at ``max_images``; patients are drawn in a seeded random
    order and all their images of that label taken while fewer than the quota are chosen
    (so a count can exceed it by one patient's images). Near-duplicate links stay in the
    ``dup_group`` column, so splits still keep them together.

    Returns:
        The subset manifest (absolute image paths).
    """
    from covidcxr.data.manifest import write_manifest
    from covidcxr.data.sources import load_source

    manifest = load_source(Path(collection)).manifest
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for (_, _), part in manifest.groupby(["source", "label"], sort=True):
        quota = max(int(round(fraction * len(part))), min_images)
        if max_images is not None:
            quota = min(quota, max_images)
        patients = np.array(sorted(part["patient_id"].astype(str).unique()))
        chosen = 0
        for patient in rng.permutation(patients):
            if chosen >= quota:
                break
            rows = part.index[part["patient_id"].astype(str) == patient].to_numpy()
            keep.append(rows)
            chosen += len(rows)
    subset = manifest.loc[np.sort(np.concatenate(keep))] if keep else manifest.iloc[:0]
    write_manifest(subset.reset_index(drop=True), Path(target))
    return subset.reset_index(drop=True)


def task_rows(recipe: TrainRecipe) -> pd.DataFrame:
    """Every image of the recipe's collection (all sources) that fits its task, with ``class_name`` and ``target``."""
    from covidcxr.train.data import load_records, select_task

    manifest, _ = load_records(recipe)
    every_source = recipe.model_copy(deep=True)
    every_source.data.sources = []
    every_source.data.negatives_from = []
    rows, _ = select_task(manifest, every_source)
    return rows


def linked_to(rows: pd.DataFrame, used: Sequence[pd.DataFrame]) -> np.ndarray:
    """(N,) bool: rows sharing a patient, near-duplicate group, file hash or path with any ``used`` frame (`covidcxr.rundir.linked_rows`)."""
    return linked_rows(rows, used)


def test_images(recipe: TrainRecipe, run_dir: str | Path, pretrain_dir: str | Path | None = None, sources: str | Sequence[str] = "all") -> pd.DataFrame:
    """The images a trained run is tested on, per source (the rule in the module docstring).

    Args:
        recipe: the run's recipe (its collection and task).
        run_dir: the trained run (``manifest.parquet`` with the split).
        pretrain_dir: its stage-1 run, whose train/val images are excluded too.
        sources: ``"all"`` (every source of the collection) or a list.

    Returns:
        Manifest rows with ``class_name``, ``target``, ``seen`` (bool) and ``linked_out``
        (how many of that source's candidate images were excluded as linked), one row per
        test image, sources in order.

    Raises:
        CovidCXRError: a named source is not in the collection.
    """
    run = RunDir(run_dir)
    run_manifest = run.read_manifest()
    seen = run.seen(also=[pretrain_dir] if pretrain_dir is not None else [])
    seen_sources = seen.sources
    everything = task_rows(recipe)
    present = sorted(set(everything["source"].astype(str)) | set(run_manifest["source"].astype(str)))
    wanted = present if sources == "all" else list(sources)
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise CovidCXRError(f"experiment.test_sources: {unknown} not in the collection; it has {present}")
    parts = []
    for source in wanted:
        if source in seen_sources:
            candidates = run_manifest[(run_manifest["split"] == "test") & (run_manifest["source"].astype(str) == source)]
        else:
            candidates = everything[everything["source"].astype(str) == source]
        linked = seen.linked(candidates)
        part = candidates[~linked].copy()
        part["split"] = "test"
        part["seen"] = source in seen_sources
        part["linked_out"] = int(linked.sum())
        parts.append(part)
    keep = [c for c in everything.columns if c != "split"] + ["split", "seen", "linked_out"]
    frames = [p[[c for c in keep if c in p.columns]] for p in parts if len(p)]
    if not frames:
        return pd.DataFrame(columns=keep)
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------- predictions


def predict_images(run_dir: str | Path, rows: pd.DataFrame, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``rows`` with a trained run's model (`load_run`: best.ckpt, or its snapshot ensemble).

    Returns:
        ``(scored, rejected)``: the rows the preprocessing kept, with ``positive`` (1 when
        the image is of the scored class), ``probability`` (of that class) and
        ``probabilities`` (JSON list of every class' probability, multi-class runs only);
        and the rows it rejected (``image``, ``source``, ``reason``).
    """
    from covidcxr.train.inference import cached_inputs, load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    classes = list(loaded.classes)
    scored_class = positive_class(loaded.recipe)
    column = classes.index(scored_class)
    scored_parts, rejected_parts = [], []
    # chunks of at most 2000 images bound the memory (~0.5 GB of float32 at 224 px)
    for start in range(0, len(rows), 2000):
        part = rows.iloc[start : start + 2000]
        kept, images, _, excluded = cached_inputs(part.reset_index(drop=True), loaded.recipe, progress=progress)
        rejected_parts.append(excluded)
        if not len(kept):
            continue
        probabilities = loaded.predict(images)
        kept = kept.copy()
        if loaded.binary:
            kept["probability"] = probabilities.reshape(-1).astype(np.float64)
            kept["probabilities"] = None
        else:
            kept["probability"] = probabilities[:, column].astype(np.float64)
            kept["probabilities"] = [json.dumps([round(float(v), 6) for v in row]) for row in probabilities]
        kept["positive"] = (kept["class_name"].astype(str) == scored_class).astype(np.int64)
        scored_parts.append(kept)
    scored = pd.concat(scored_parts, ignore_index=True) if scored_parts else pd.DataFrame(columns=[*rows.columns, "positive", "probability", "probabilities"])
    rejected = pd.concat(rejected_parts, ignore_index=True) if rejected_parts else pd.DataFrame(columns=["image", "split", "source", "reason"])
    return scored, rejected


# ---------------------------------------------------------------------------------- metrics


def _binary_rows(scored: pd.DataFrame) -> pd.DataFrame:
    frame = scored[["source", "patient_id", "positive", "probability"]].rename(columns={"positive": "target"}).copy()
    frame["split"] = "test"
    return frame


def _multiclass(scored: pd.DataFrame, classes: Sequence[str] | None) -> dict[str, Any] | None:
    """3-class and 2-class accuracy and the confusion matrix (Apostolopoulos & Mpesiana 2020, Tables 2-3)."""
    from covidcxr.evaluate.metrics import three_class_accuracy, two_class_accuracy

    if classes is None or len(classes) < 3 or scored["probabilities"].isna().all():
        return None
    probabilities = np.array([json.loads(p) for p in scored["probabilities"]])
    predicted = probabilities.argmax(axis=1)
    truth = scored["target"].to_numpy().astype(np.int64)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    out: dict[str, Any] = {"classes": list(classes), "confusion": confusion.tolist()}
    if k == 3:
        out["accuracy_3class"] = three_class_accuracy(confusion=confusion)
    if "covid" in classes:
        out["accuracy_2class"] = two_class_accuracy(confusion=confusion, covid_class=list(classes).index("covid"))
    return out


def source_metrics(scored: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, classes: Sequence[str] | None = None) -> dict[str, dict[str, Any] | None]:
    """Metrics with patient-bootstrap CIs per test source (`metrics_for_rows`), keyed by source.

    Each dict gains ``seen`` and, for multi-class runs, ``multiclass`` (3-/2-class accuracy,
    confusion matrix). A source whose images all were rejected or linked out maps to None.
    """
    from covidcxr.evaluate.cross_source import metrics_for_rows

    out: dict[str, dict[str, Any] | None] = {}
    for source, part in scored.groupby("source", sort=False):
        metrics = metrics_for_rows(_binary_rows(part), threshold=threshold, n_boot=n_boot, seed=seed)
        if metrics is not None:
            metrics["seen"] = bool(part["seen"].iloc[0])
            multiclass = _multiclass(part, classes)
            if multiclass is not None:
                metrics["multiclass"] = multiclass
        out[str(source)] = metrics
    return out


def pooled_metrics(scored: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Seen sources pooled vs unseen sources pooled: metrics, the DeLong AUC gap, the accuracy gap.

    Returns:
        ``{"seen": metrics or None, "unseen": metrics or None, "all": metrics, "gap": {...},
        "accuracy_gap": {...}}``; ``accuracy_gap`` compares the share of correct decisions
        on seen vs unseen images with Fisher's exact test (the two groups hold different
        images, so a paired McNemar test does not apply here; McNemar compares two models
        on the same images, see `covidcxr.experiments.analyses`).
    """
    from scipy.stats import fisher_exact

    from covidcxr.evaluate.cross_source import metrics_for_rows, seen_unseen

    rows = _binary_rows(scored)
    seen_sources = sorted(set(scored.loc[scored["seen"].astype(bool), "source"].astype(str)))
    result = seen_unseen(rows, seen_sources, split="test", threshold=threshold, n_boot=n_boot, seed=seed)
    correct = (rows["probability"].to_numpy() >= threshold).astype(int) == rows["target"].to_numpy()
    seen_mask = scored["seen"].astype(bool).to_numpy()
    table = [[int(correct[seen_mask].sum()), int((~correct[seen_mask]).sum())], [int(correct[~seen_mask].sum()), int((~correct[~seen_mask]).sum())]]
    accuracy_gap: dict[str, Any] = {"table": table, "note": "rows seen/unseen, columns correct/wrong; Fisher's exact test"}
    if seen_mask.any() and (~seen_mask).any():
        odds, p_value = fisher_exact(table)
        accuracy_gap.update({
            "accuracy_seen": table[0][0] / max(1, sum(table[0])),
            "accuracy_unseen": table[1][0] / max(1, sum(table[1])),
            "odds_ratio": None if not np.isfinite(odds) else float(odds),
            "p_value": float(p_value),
        })
    out = {
        "seen": result["seen"],
        "unseen": result["unseen"],
        "all": metrics_for_rows(rows, threshold=threshold, n_boot=n_boot, seed=seed),
        "gap": result["gap"],
        "accuracy_gap": accuracy_gap,
        "seen_sources": result["seen_sources"],
        "unseen_sources": result["unseen_sources"],
    }
    for name in ("seen", "unseen", "all"):
        part = scored if name == "all" else scored[seen_mask == (name == "seen")]
        multiclass = _multiclass(part, classes) if len(part) else None
        if out[name] is not None and multiclass is not None:
            out[name]["multiclass"] = multiclass
    return out


# ---------------------------------------------------------------------------------- adaptation


def write_adaptation_manifest(adapt: Any, seed: int | None = None) -> pd.DataFrame:
    """The manifest of a local-adaptation run (Ben Ahmed et al. 2021, Table 4), written atomically.

    From the point's collection: ``positives.images`` images of the scored class from
    ``positives.source`` and ``negatives.images`` images of the other classes from
    ``negatives.source``, drawn patient by patient (seeded), none linked to what the point
    or its stage-1 run trained or validated on; split train/val by patient
    (``val_fraction``). Every other image of those two sources that fits (and is linked
    neither to the point's training nor to the adaptation images) is the ``test`` split,
    on which the point is scored before and the adapted model after.

    Args:
        adapt: an `AdaptRun` whose point is trained.

    Returns:
        The manifest written to ``adapt.manifest_path`` (``split`` column: train/val/test).

    Raises:
        CovidCXRError: a source is missing or has too few usable images.
    """
    from covidcxr.data.manifest import write_manifest
    from covidcxr.data.splits import split_train_val_test

    point = adapt.point
    spec_positives, spec_negatives, val_fraction, spec_seed = _adapt_spec(adapt)
    rng = np.random.default_rng(spec_seed if seed is None else seed)
    rows = task_rows(point.recipe)
    scored_class = positive_class(point.recipe)
    seen = RunDir(point.run_dir).seen(also=[point.pretrain.run_dir] if point.pretrain is not None else [])
    rows = rows[~seen.linked(rows)]
    chosen = []
    pools = []
    for spec, is_positive in ((spec_positives, True), (spec_negatives, False)):
        pool = rows[(rows["source"].astype(str) == spec.source) & ((rows["class_name"].astype(str) == scored_class) == is_positive)]
        kind = "positive" if is_positive else "negative"
        if pool.empty:
            raise CovidCXRError(f"experiment.adapt.{kind}s.source: {spec.source!r} has no usable {kind} image for this point (absent, or all linked to its training data)")
        taken, count = [], 0
        for patient in rng.permutation(np.array(sorted(pool["patient_id"].astype(str).unique()))):
            if count >= spec.images:
                break
            part = pool[pool["patient_id"].astype(str) == patient]
            taken.append(part)
            count += len(part)
        if count < spec.images:
            raise CovidCXRError(f"experiment.adapt.{kind}s.images: {spec.source!r} has {count} usable {kind} images for this point, {spec.images} asked")
        chosen.append(pd.concat(taken))
        pools.append(pool)
    fit = pd.concat(chosen)
    fit = split_train_val_test(fit, test_size=0.0, val_size=val_fraction, stratify=("source", "label"), seed=spec_seed)
    rest = pd.concat(pools)
    rest = rest[~rest["image"].isin(fit["image"]) & ~linked_to(rest, [fit])].copy()
    rest["split"] = "test"
    manifest = pd.concat([fit, rest], ignore_index=True)
    keep = [c for c in manifest.columns if c not in ("class_name", "target")]
    path = Path(adapt.manifest_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest[keep], path)
    return manifest


def _adapt_spec(adapt: Any) -> tuple[Any, Any, float, int]:
    spec = adapt.spec
    return spec.positives, spec.negatives, spec.val_fraction, spec.seed


def before_after(before: pd.DataFrame, after: pd.DataFrame, threshold: float | tuple[float, float] = 0.5) -> dict[str, Any]:
    """Table 4 of Ben Ahmed et al.: per class and source, accuracy before and after adaptation, on the same images.

    Args:
        before: the point's scored test images (`predict_images`).
        after: the adapted model's scored test images.
        threshold: one threshold for both models, or ``(before's, after's)``: each
            model's own operating point.

    Returns:
        ``{"rows": [{source, class, n, before, after}], "mcnemar": {...}, "delong": {...}}``:
        McNemar's test on the paired correctness of the two models' decisions and DeLong's
        test of the two AUCs, both on the images both scored.
    """
    from covidcxr.evaluate.metrics import MetricInputError
    from covidcxr.evaluate.stats import delong_test, mcnemar_test

    merged = before[["image", "source", "positive", "probability"]].merge(after[["image", "probability"]], on="image", suffixes=("_before", "_after"))
    y = merged["positive"].to_numpy().astype(np.int64)
    thresholds = dict(zip(("before", "after"), threshold if isinstance(threshold, tuple) else (threshold, threshold)))
    decided = {name: (merged[f"probability_{name}"].to_numpy() >= thresholds[name]).astype(np.int64) for name in ("before", "after")}
    rows = []
    for (source, positive), part in merged.groupby(["source", "positive"], sort=True):
        index = part.index.to_numpy()
        rows.append({
            "source": str(source),
            "class": "positive" if positive else "negative",
            "n": int(len(part)),
            "before": float(np.mean(decided["before"][index] == y[index])),
            "after": float(np.mean(decided["after"][index] == y[index])),
        })
    out: dict[str, Any] = {"rows": rows, "n_images": int(len(merged)), "threshold": threshold}
    if len(merged):
        out["mcnemar"] = mcnemar_test(y, decided["before"], decided["after"])
        out["accuracy_before"] = float(np.mean(decided["before"] == y))
        out["accuracy_after"] = float(np.mean(decided["after"] == y))
    try:
        out["delong"] = delong_test(y, merged["probability_before"].to_numpy(), merged["probability_after"].to_numpy())
    except MetricInputError as exc:
        out["delong"] = {"note": str(exc)}
    return out
