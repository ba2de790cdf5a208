"""Training data: manifest -> task -> patient-disjoint split -> composition -> cache -> batches.

The order of the steps, and why:

1. **records** (`load_records`): the collection (any adapter's layout), a manifest file, or
   phantoms written by `covidcxr.data.synth.synthesize` (resumable, so the demo recipe
   needs no data). A raw layout (a hospital's folders, a public dataset) gets its
   exact copies and near-duplicates grouped from the pixels (`link_duplicates`).
2. **task** (`select_task`): frontal views if asked, the recipe's sources, the task's
   labels, and the integer ``target`` (``class_name`` says which class it is). Kermany's
   bacterial/viral classes come from the ``finding`` column.
3. **split** (`split_records`): by patient and near-duplicate group
   (`covidcxr.data.splits`), then `check_leakage` (an error, never a warning). The split
   is made *before* preprocessing, so it does not depend on the preprocessing settings:
   two runs that differ only in preprocessing train and test on the same patients.
4. **composition** (`compose_records`): `covidcxr.data.compose.compose` for binary tasks
   (balanced train/val, negatives borrowed from ``negatives_from``; Tartaglione Table 1),
   the same rules per class for multi-class tasks.
5. **cache** (`CXRDataModule.prepare_data`): `preprocess_collection` for exactly these
   rows (hits when already done); rows with a ``rejected_reason`` are excluded and listed.
6. **batches**: a `CachedImageDataset` (decoded inputs held in memory for small sets) and,
   for training, an `EpochSampler` — a class-balanced draw (or a permutation) fixed by
   (seed, epoch), sharded across DDP ranks, and resumable mid-epoch: a checkpoint records
   how many batches of the epoch were done and a resumed run skips exactly those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from covidcxr.data.compose import Composition, compose
from covidcxr.data.manifest import LABELS, SPLITS, is_missing, read_manifest
from covidcxr.data.sources import Rejection, detect_source, load_source
from covidcxr.data.splits import check_leakage, group_kfold, leave_one_source_out, link_duplicates, split_train_val_test
from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.cache import PreprocessResult, config_dir, entry_path, preprocess_collection, read_entry
from covidcxr.train.recipe import TASKS, TrainRecipe

__all__ = [
    "CXRDataModule",
    "CachedImageDataset",
    "EpochSampler",
    "PreparedData",
    "ResumableDataLoader",
    "build_records",
    "compose_records",
    "load_records",
    "manifest_hash",
    "sample_weights",
    "select_task",
    "split_ids",
    "split_records",
]

# Columns of the run's manifest.parquet beyond the manifest's own (what training used).
RUN_COLUMNS = ("split", "fold", "target", "class_name", "role", "composition", "cache_key", "file_sha1")
IN_MEMORY_LIMIT_BYTES = 2 << 30


# ---------------------------------------------------------------------------------- records


def synthetic_dir(recipe: TrainRecipe) -> Path:
    """Where a recipe's phantoms live: ``data.collection``, else a folder named by their parameters."""
    if recipe.data.collection:
        return Path(recipe.data.collection)
    params = recipe.data.synthetic.model_dump(mode="json") if recipe.data.synthetic else {}
    if params.get("label_mix") is None:
        params.pop("label_mix", None)  # folders made before the option existed keep their name
    if params.get("finding_scale") == 1.0:
        params.pop("finding_scale", None)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(recipe.preprocess.cache_dir) / f"phantoms-{digest}"


def load_records(recipe: TrainRecipe, progress: bool = False) -> tuple[pd.DataFrame, list[Rejection]]:
    """The recipe's images as a canonical manifest, and what the adapter could not read.

    Raises:
        CovidCXRError: a missing folder or file, or an unreadable layout (naming it).
    """
    data = recipe.data
    if data.synthetic is not None:
        from covidcxr.data.synth import DEFAULT_SITES, ShortcutSpec, synthesize

        spec = data.synthetic
        shortcut = None
        if spec.shortcut is not None:
            shortcut = ShortcutSpec(
                kind=spec.shortcut.kind,
                site=spec.shortcut.site,
                label=spec.shortcut.label,
                strength=spec.shortcut.strength,
                false_rate=spec.shortcut.false_rate,
            )
        folder = synthetic_dir(recipe)
        sites = DEFAULT_SITES
        if spec.label_mix is not None:
            sites = tuple(dataclasses.replace(site, label_mix=dict(spec.label_mix)) for site in DEFAULT_SITES)
        try:
            synthesize(
                folder,
                n_images=spec.n_images,
                sites=sites,
                size=spec.size,
                shortcut=shortcut,
                seed=spec.seed,
                images_per_patient=tuple(spec.images_per_patient),
                finding_scale=spec.finding_scale,
            )
        except FileExistsError as exc:
            raise CovidCXRError(f"data.collection {folder}: {exc}") from None
        table = load_source(folder)
        return table.manifest, list(table.rejected)
    if data.manifest:
        path = Path(data.manifest)
        if not path.is_file():
            raise CovidCXRError(f"data.manifest {path} does not exist")
        return read_manifest(path), []
    folder = Path(data.collection or "")
    if not folder.is_dir():
        raise CovidCXRError(f"data.collection {folder} is not a folder")
    adapter = data.adapter or detect_source(folder)
    table = load_source(folder, adapter)
    if adapter == "collection":  # a covidcxr collection's manifest.csv lists its dup_group
        return table.manifest, list(table.rejected)
    # A raw layout (a hospital's folders, a public dataset) lists no duplicates: find them
    # from the pixels, and refuse copies filed under different labels.
    manifest, unreadable = link_duplicates(table.manifest, show_progress=progress)
    return manifest, [*table.rejected, *unreadable]


def _kermany_class(label: str, finding: object) -> str | None:
    if label == "normal":
        return "normal"
    if label != "pneumonia" or is_missing(finding):
        return None
    text = str(finding).lower()
    if "bacteri" in text:
        return "bacterial"
    if "vir" in text:
        return "viral"
    return None


def select_task(manifest: pd.DataFrame, recipe: TrainRecipe) -> tuple[pd.DataFrame, list[str]]:
    """Keep the rows the task uses and add ``class_name`` and ``target``.

    Returns:
        ``(rows, notes)``: notes say what was left out and why (one line per reason).

    Raises:
        CovidCXRError: a named source is absent, or nothing is left.
    """
    data = recipe.data
    notes: list[str] = []
    frame = manifest.reset_index(drop=True).copy()
    present = sorted(set(frame["source"]))
    for source in (*data.sources, *data.negatives_from):
        if source not in present:
            raise CovidCXRError(f"data.sources: source {source!r} is not in the collection; it has {present}")
    if data.split.kind == "loso" and data.split.test_source not in present:
        raise CovidCXRError(f"data.split.test_source: {data.split.test_source!r} is not in the collection; it has {present}")
    if data.sources:
        keep = frame["source"].isin([*data.sources, *data.negatives_from])
        if (~keep).any():
            notes.append(f"{int((~keep).sum())} images of other sources left out ({sorted(set(frame.loc[~keep, 'source']))})")
        frame = frame[keep]
    if data.views is not None:
        keep = frame["view"].isin(data.views)
        if (~keep).any():
            notes.append(f"{int((~keep).sum())} images with a view other than {data.views} left out")
        frame = frame[keep]

    classes = TASKS[data.task]
    if data.task == "covid_vs_rest":
        negatives = set(data.negative_labels) if data.negative_labels is not None else {"pneumonia", "normal", "other"}
        names = frame["label"].map(lambda lab: "covid" if lab == "covid" else ("rest" if lab in negatives else None))
    elif data.task == "pneumonia_vs_normal":
        names = frame["label"].map(lambda lab: lab if lab in ("pneumonia", "normal") else None)
    elif data.task == "three_class":
        names = frame["label"].map(lambda lab: lab if lab in ("normal", "pneumonia", "covid") else None)
    else:  # kermany3
        names = pd.Series([_kermany_class(lab, f) for lab, f in zip(frame["label"], frame["finding"])], index=frame.index)
    unused = names.isna()
    if unused.any():
        counts = frame.loc[unused, "label"].value_counts().to_dict()
        notes.append(f"{int(unused.sum())} images outside the task {data.task} {list(classes)} left out (labels {counts})")
    frame = frame[~unused].copy()
    frame["class_name"] = names[~unused].astype(str).to_numpy()
    frame["target"] = frame["class_name"].map({name: i for i, name in enumerate(classes)}).astype(np.int64)
    if frame.empty:
        raise CovidCXRError(f"data.task: no image of the collection fits the task {data.task} {list(classes)}")
    return frame.reset_index(drop=True), notes


def split_records(rows: pd.DataFrame, recipe: TrainRecipe, fold: int | None = None) -> tuple[pd.DataFrame, list[Rejection]]:
    """Patient-disjoint split of the task's rows; leakage is checked (and is an error).

    ``kfold`` needs ``fold`` (the test fold); its val set is ``val_size`` of the other folds,
    by patient. Returns the rows with ``split`` (and ``fold``) and the rows removed by
    leave-one-source-out (linked to the held-out source).
    """
    spec = recipe.data.split
    seed = recipe.seed if spec.seed is None else spec.seed
    stratify = tuple(spec.stratify)
    removed: list[Rejection] = []
    if spec.kind == "holdout":
        out = split_train_val_test(rows, test_size=spec.test_size, val_size=spec.val_size, stratify=stratify, seed=seed)
    elif spec.kind == "kfold":
        if fold is None:
            raise CovidCXRError("data.split.fold: a k-fold run trains one fold at a time; name the fold")
        folded = group_kfold(rows, n_splits=spec.folds, stratify=stratify, seed=seed)
        test = folded[folded["fold"] == fold].copy()
        test["split"] = "test"
        rest = folded[folded["fold"] != fold]
        rest = split_train_val_test(rest, test_size=0.0, val_size=spec.val_size, stratify=stratify, seed=seed)
        out = pd.concat([rest, test], ignore_index=True)
    elif spec.kind == "loso":
        out, removed = leave_one_source_out(rows, spec.test_source or "", val_size=spec.val_size, stratify=stratify, seed=seed)
    else:  # given
        if "split" not in rows.columns:
            raise CovidCXRError("data.split.kind: 'given' needs a split column in the manifest")
        out = rows[~rows["split"].map(is_missing)].copy()
        bad = sorted(set(out["split"]) - set(SPLITS))
        if bad:
            raise CovidCXRError(f"data.split.kind: the manifest's split column has values {bad}; expected {list(SPLITS)}")
    check_leakage(out, column="split")
    return out.reset_index(drop=True), removed


def _compose_multiclass(frame: pd.DataFrame, recipe: TrainRecipe, seed: int) -> pd.DataFrame:
    """`compose`'s rules for more than two classes: borrow lenders' images of short classes, then subsample."""
    data = recipe.data
    own_sources = data.sources or sorted(set(frame["source"]) - set(data.negatives_from))
    own = frame[frame["source"].isin(own_sources)].copy()
    own["role"] = "own"
    lent = frame[frame["source"].isin(data.negatives_from) & ~frame["source"].isin(own_sources)].copy()
    lent = lent[lent["class_name"] != "covid"]  # lenders lend negatives only
    lent["role"] = "borrowed"
    rng = np.random.default_rng(seed)
    classes = TASKS[data.task]

    def take(part: pd.DataFrame, count: int) -> pd.DataFrame:
        if count >= len(part):
            return part
        return part.iloc[np.sort(rng.choice(len(part), size=count, replace=False))]

    parts = []
    for split in SPLITS:
        mine, theirs = own[own["split"] == split], lent[lent["split"] == split]
        if split not in data.balance_splits or data.balance == "none":
            parts.extend([mine, theirs])
            continue
        per_class = {c: mine[mine["class_name"] == c] for c in classes}
        if data.balance == "borrow":
            most = max(len(p) for p in per_class.values())
            for c in classes:
                if len(per_class[c]) < most:
                    extra = take(theirs[theirs["class_name"] == c], most - len(per_class[c]))
                    per_class[c] = pd.concat([per_class[c], extra])
        size = min(len(p) for p in per_class.values())
        if size == 0 and len(mine) > 0:
            counts = {c: len(p) for c, p in per_class.items()}
            raise CovidCXRError(
                f"data.balance: the {split} split has {counts} images per class; cannot balance "
                "(add data.negatives_from, or set data.balance=none)"
            )
        parts.extend(take(p, size) for p in per_class.values())
    result = pd.concat(parts).sort_index()
    result["composition"] = "+".join([*own_sources, *data.negatives_from])
    return result.reset_index(drop=True)


def compose_records(rows: pd.DataFrame, recipe: TrainRecipe) -> pd.DataFrame:
    """The training-set composition of Tartaglione et al. (Table 1): own and borrowed images, balanced."""
    data = recipe.data
    seed = recipe.seed if data.split.seed is None else data.split.seed
    if len(TASKS[data.task]) > 2:
        return _compose_multiclass(rows, recipe, seed)
    own_sources = tuple(data.sources) or tuple(sorted(set(rows["source"]) - set(data.negatives_from)))
    if data.task == "covid_vs_rest":
        positive = ("covid",)
        negative = tuple(data.negative_labels) if data.negative_labels is not None else tuple(label for label in LABELS if label != "covid")
    else:
        positive, negative = ("pneumonia",), ("normal",)
    composition = Composition(
        name="+".join([*own_sources, *data.negatives_from]) or "all",
        sources=own_sources,
        negatives_from=tuple(data.negatives_from),
        positive_labels=positive,
        negative_labels=negative,
        balance=data.balance,
        balance_splits=tuple(data.balance_splits),
    )
    out = compose(rows, composition, seed=seed)
    out["class_name"] = out["target"].map(dict(enumerate(TASKS[data.task])))
    return out


def build_records(recipe: TrainRecipe, fold: int | None = None) -> tuple[pd.DataFrame, list[str], list[Rejection]]:
    """load -> task -> split -> compose: the rows a run will preprocess, before the cache.

    Returns:
        ``(records, notes, rejected)``: the composed rows (``split``, ``target``,
        ``class_name``, ``role``), what was left out in words, and images the adapter or
        the leave-one-source-out rule removed.
    """
    manifest, rejected = load_records(recipe)
    rows, notes = select_task(manifest, recipe)
    split, removed = split_records(rows, recipe, fold=fold if fold is not None else recipe.data.split.fold)
    records = compose_records(split, recipe)
    left = len(split) - len(records)
    if left:
        notes.append(f"{left} images not used by the {recipe.data.balance!r} balancing of {list(recipe.data.balance_splits)}")
    if "fold" not in records.columns:
        records["fold"] = pd.array([pd.NA] * len(records), dtype="Int64")
    return records, notes, [*rejected, *removed]


# ---------------------------------------------------------------------------------- hashes


def _identity_column(records: pd.DataFrame) -> pd.Series:
    if "file_sha1" in records.columns:
        return records["file_sha1"].astype(str)
    return records["image"].astype(str)


def split_ids(records: pd.DataFrame) -> str:
    """SHA-256 of the sorted (image content SHA-1, split) list: equal iff the same images fall the same way."""
    pairs = sorted(zip(_identity_column(records), records["split"].astype(str)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def manifest_hash(records: pd.DataFrame) -> str:
    """SHA-256 of the used records (content hash, split, fold, target, source, patient), order-free."""
    fold = records["fold"] if "fold" in records.columns else pd.Series([None] * len(records), index=records.index)
    rows = sorted(
        zip(
            _identity_column(records),
            records["split"].astype(str),
            [None if is_missing(v) else int(v) for v in fold],
            records["target"].astype(int),
            records["source"].astype(str),
            records["patient_id"].astype(str),
        ),
        key=lambda r: (r[0], r[1]),
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ---------------------------------------------------------------------------------- dataset


class CachedImageDataset(Dataset):
    """Model inputs from the preprocessing cache: ``(image (1, H, W) float16, target, row)``.

    Args:
        entry_paths: the cache entry file of every row.
        targets: integer targets, row-aligned.
        in_memory: decode every entry once, up front (threads), and keep the float16
            arrays; otherwise read an entry per item (``.npz`` decompression, ~1 ms).

    The image stays float16 (the cache's precision) until the batch reaches the device,
    where the LightningModule converts it; ``row`` indexes the records table.
    """

    def __init__(self, entry_paths: list[Path], targets: np.ndarray, in_memory: bool = True) -> None:
        if len(entry_paths) != len(targets):
            raise CovidCXRError(f"{len(entry_paths)} cache entries but {len(targets)} targets")
        self.entry_paths = [Path(p) for p in entry_paths]
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.images: torch.Tensor | None = None
        if in_memory and self.entry_paths:
            with ThreadPoolExecutor(max_workers=4) as pool:
                arrays = list(pool.map(self._read, self.entry_paths))
            self.images = torch.from_numpy(np.stack(arrays)[:, None])

    @classmethod
    def from_arrays(cls, images: np.ndarray | torch.Tensor, targets: np.ndarray) -> CachedImageDataset:
        """A dataset over images already in memory: ``(N, H, W)`` or ``(N, 1, H, W)`` in [0, 1]."""
        dataset = cls([], np.zeros(0, dtype=np.int64))
        tensor = torch.as_tensor(np.asarray(images, dtype=np.float16))
        dataset.images = tensor[:, None] if tensor.ndim == 3 else tensor
        dataset.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        dataset.entry_paths = [Path("<memory>")] * len(dataset.targets)
        return dataset

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        return read_entry(path).image.astype(np.float16)

    def __len__(self) -> int:
        return len(self.entry_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.images is not None:
            image = self.images[index]
        else:
            image = torch.from_numpy(self._read(self.entry_paths[index])[None])
        return image, self.targets[index], index


def sample_weights(sources: np.ndarray, targets: np.ndarray, balancing: str, single_label_sources: str = "keep") -> np.ndarray | None:
    """Per-image draw weights of the training split (``None``: a plain permutation).

    ``source_label`` (label-source decorrelation): every source weighs the same and, within
    a source, every label it has weighs the same — ``w(s, y) = 1 / (S * L_s * n_{s,y})``
    with ``S`` sources, ``L_s`` labels at source ``s`` and ``n_{s,y}`` images of label
    ``y`` there. Each source then contributes the same label mix (uniform over its labels),
    so in the drawn data the source says nothing about the label (the confound of
    Tartaglione et al. 2020 Table 1 and Maguolo & Nanni 2021). ``sampler``: every class
    weighs the same. Otherwise uniform (returned only when sources are excluded).

    ``single_label_sources='exclude'``: sources whose images all have one label get weight
    0 — never drawn, so never in the loss; they could only teach the source.

    Args:
        sources: (N,) source of each training image.
        targets: (N,) integer target of each training image.
        balancing: ``train.balancing``.
        single_label_sources: ``keep`` or ``exclude``.

    Returns:
        (N,) float64 weights summing to 1, or None for a uniform permutation.

    Raises:
        CovidCXRError: every source is single-label and would be excluded.

    Example:
        >>> w = sample_weights(np.array(["a", "a", "a", "b"]), np.array([0, 0, 1, 1]), "source_label")
        >>> w.round(3).tolist()
        [0.125, 0.125, 0.25, 0.5]
    """
    sources = np.asarray(sources).astype(str)
    targets = np.asarray(targets, dtype=np.int64)
    frame = pd.DataFrame({"source": sources, "target": targets})
    labels_per_source = frame.groupby("source")["target"].nunique()
    keep = np.ones(len(frame), dtype=bool)
    if single_label_sources == "exclude":
        multi = set(labels_per_source[labels_per_source > 1].index)
        keep = frame["source"].isin(multi).to_numpy()
        if not keep.any():
            raise CovidCXRError(
                f"train.single_label_sources: every training source has a single label ({labels_per_source.to_dict()}); "
                "excluding them leaves nothing to train on"
            )
    elif balancing not in ("source_label", "sampler"):
        return None
    kept = frame[keep]
    weights = np.zeros(len(frame), dtype=np.float64)
    if balancing == "source_label":
        n_sources = kept["source"].nunique()
        cell = kept.groupby(["source", "target"]).size()
        labels = kept.groupby("source")["target"].nunique()
        for i in np.nonzero(keep)[0]:
            s, y = sources[i], targets[i]
            weights[i] = 1.0 / (n_sources * labels[s] * cell[(s, y)])
    elif balancing == "sampler":
        counts = kept["target"].value_counts()
        weights[keep] = 1.0 / counts.reindex(targets[keep]).to_numpy()
    else:
        weights[keep] = 1.0
    return weights / weights.sum()


class EpochSampler(Sampler[int]):
    """Training order of one epoch, fixed by (seed, epoch); class-balanced or a permutation.

    ``balanced``: ``len(targets)`` draws with replacement, each class equally likely (the
    ``WeightedRandomSampler`` of balanced training), else a random permutation. ``weights``
    (`sample_weights`) replaces the class-balanced weights of a balanced draw. Under DDP
    every rank draws the same order and takes every ``world_size``-th index (padded by
    wrapping so ranks see equal counts). `resume_at` makes the next iteration start
    part-way through an epoch (a run resumed from a mid-epoch checkpoint).
    """

    def __init__(
        self,
        targets: np.ndarray | torch.Tensor,
        balanced: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: np.ndarray | None = None,
    ) -> None:
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.balanced = balanced
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = max(1, int(world_size))
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        counts = torch.bincount(self.targets) if len(self.targets) else torch.zeros(0)
        self.weights = torch.zeros(len(self.targets), dtype=torch.float64)
        if len(self.targets):
            self.weights = 1.0 / counts[self.targets].double()
        if weights is not None:
            self.balanced = True
            self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Make the next iteration epoch ``epoch``'s order without its first ``skip`` indices."""
        self._resume = (int(epoch), int(skip))

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.world_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's full index order of ``epoch``."""
        n = len(self.targets)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.balanced and n:
            indices = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            indices = torch.randperm(n, generator=generator)
        total = len(self) * self.world_size
        if total > n:
            indices = torch.cat([indices, indices[: total - n]])
        return indices[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, 0
        if self._resume is not None:
            (epoch, skip), self._resume = self._resume, None
            self.epoch = epoch
        return iter(self.order(epoch)[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as stateful: its checkpoint state says where the epoch was.

    ``progress`` returns ``(epoch, batches done in the epoch)``; on load, the sampler
    resumes the same epoch's order after those batches — or the next epoch when the saved
    epoch was complete — so a run killed mid-epoch sees each image of that epoch once.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._progress() if self._progress else (0, 0)
        return {"epoch": int(epoch), "batches_done": int(batches), "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        if done >= len(self):
            sampler.resume_at(epoch + 1, 0)
        else:
            sampler.resume_at(epoch, done * int(state.get("batch_size", self.batch_size or 1)))


# ---------------------------------------------------------------------------------- data module


@dataclass
class PreparedData:
    """The rows a run uses, after the cache.

    Attributes:
        records: the used rows (manifest columns + `RUN_COLUMNS`), index 0..n-1.
        excluded: rows the preprocessing rejected: ``image``, ``split``, ``reason``.
        cache_dir: the cache's config directory (``CACHE/<hash16>``).
        result: the `PreprocessResult` (hits, misses, seconds).
    """

    records: pd.DataFrame
    excluded: pd.DataFrame
    config_dir: Path
    result: PreprocessResult
    entry_paths: list[Path] = field(default_factory=list)

    def split(self, name: str) -> pd.DataFrame:
        return self.records[self.records["split"] == name]


def prepare_records(records: pd.DataFrame, recipe: TrainRecipe, progress: bool = False, workers: int | None = None) -> PreparedData:
    """Preprocess ``records`` into the cache and drop the rejected rows (reported)."""
    config = recipe.preprocess.to_config()
    result = preprocess_collection(
        records.reset_index(drop=True),
        config,
        recipe.preprocess.cache_dir,
        workers=workers if workers is not None else recipe.preprocess.workers,
        progress=progress,
        cache_mode=recipe.preprocess.cache,
    )
    index = result.index
    rejected = index["rejected_reason"].map(lambda v: not is_missing(v)).to_numpy()
    excluded = pd.DataFrame(
        {
            "image": index.loc[rejected, "image"].astype(str).to_numpy(),
            "split": index.loc[rejected, "split"].astype(str).to_numpy(),
            "source": index.loc[rejected, "source"].astype(str).to_numpy(),
            "reason": index.loc[rejected, "rejected_reason"].astype(str).to_numpy(),
        }
    )
    used = index[~rejected].reset_index(drop=True)
    directory = config_dir(recipe.preprocess.cache_dir, config)
    paths = [entry_path(directory, str(key)) for key in used["cache_key"]]
    keep = [c for c in used.columns if c not in ("cache_file", "cache_status", "mask_used", "crop_top", "crop_left", "crop_bottom", "crop_right")]
    return PreparedData(records=used[keep], excluded=excluded, config_dir=directory, result=result, entry_paths=paths)


class CXRDataModule(L.LightningDataModule):
    """Lightning DataModule over the preprocessing cache for one run (one fold).

    ``prepare_data`` (one process per node) fills the cache; ``setup`` (every process)
    reads the index back (all hits), excludes rejected rows and builds the datasets.

    Args:
        recipe: the validated recipe.
        records: the composed rows (`build_records`), not yet preprocessed.
        on_prepared: called once with the `PreparedData` on global rank 0 (the run
            writes ``manifest.parquet`` there).
        progress: show the preprocessing progress bar.
    """

    def __init__(
        self,
        recipe: TrainRecipe,
        records: pd.DataFrame,
        on_prepared: Callable[[PreparedData], None] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.records = records.reset_index(drop=True)
        self.on_prepared = on_prepared
        self.progress = progress
        self.prepared: PreparedData | None = None
        self.datasets: dict[str, CachedImageDataset] = {}
        self._train_sampler: EpochSampler | None = None
        self._announced = False

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        if self.prepared is None:
            self.prepared = prepare_records(self.records, self.recipe, progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            # another process of a multi-GPU run: the cache is full, this only looks it up
            self.prepared = prepare_records(self.records, self.recipe, progress=False, workers=1)
        if not self.datasets:
            self._check_usable()
            in_memory = self.recipe.engine.in_memory
            if in_memory is None:
                height, width = self.recipe.preprocess.size
                in_memory = len(self.prepared.records) * height * width * 2 <= IN_MEMORY_LIMIT_BYTES
            for split in SPLITS:
                rows = np.nonzero((self.prepared.records["split"] == split).to_numpy())[0]
                if len(rows):
                    self.datasets[split] = CachedImageDataset(
                        [self.prepared.entry_paths[i] for i in rows],
                        self.prepared.records["target"].to_numpy()[rows],
                        in_memory=bool(in_memory),
                    )
                    self.datasets[split].rows = rows  # type: ignore[attr-defined]
        is_zero = self.trainer is None or self.trainer.is_global_zero
        if is_zero and self.on_prepared is not None and not self._announced:
            self._announced = True
            self.on_prepared(self.prepared)

    def _check_usable(self) -> None:
        assert self.prepared is not None
        records = self.prepared.records
        classes = TASKS[self.recipe.data.task]
        train = records[records["split"] == "train"]
        if train.empty:
            raise CovidCXRError("data.split: the training split is empty after preprocessing exclusions")
        missing = [classes[t] for t in range(len(classes)) if t not in set(train["target"])]
        if missing:
            raise CovidCXRError(f"data: the training split has no image of class {missing}; check data.sources and data.task")
        if self.recipe.has_validation:
            val = records[records["split"] == "val"]
            if val.empty:
                raise CovidCXRError("data.split.val_size: the validation split is empty; raise val_size or set it to 0 (and train.monitor=none)")
            monitors = {self.recipe.train.monitor, self.recipe.early_stopping.monitor, self.recipe.snapshots.metric if self.recipe.snapshots.count else None}
            if "val_auc" in monitors and val["target"].nunique() < 2:
                raise CovidCXRError(
                    f"train.monitor: val_auc is undefined, the validation split holds only class "
                    f"{classes[int(val['target'].iloc[0])]!r} ({len(val)} images); monitor val_loss or raise data.split.val_size"
                )

    # ------------------------------------------------------------------ loaders
    @property
    def class_counts(self) -> list[int]:
        """Training images per class, in target order."""
        assert self.prepared is not None
        train = self.prepared.split("train")
        counts = np.bincount(train["target"].to_numpy(dtype=np.int64), minlength=len(TASKS[self.recipe.data.task]))
        return [int(c) for c in counts]

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.recipe.engine.num_workers
        pin = bool(self.trainer is not None and self.trainer.accelerator.__class__.__name__.lower().startswith("cuda"))
        return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin}

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        spec = self.recipe.train
        sources = self.prepared.records["source"].to_numpy()[dataset.rows]  # type: ignore[union-attr,attr-defined]
        self._train_sampler = EpochSampler(
            dataset.targets.numpy(),
            balanced=spec.balancing == "sampler",
            seed=self.recipe.seed,
            rank=rank,
            world_size=world,
            weights=sample_weights(sources, dataset.targets.numpy(), spec.balancing, spec.single_label_sources),
        )
        return ResumableDataLoader(
            dataset,
            batch_size=self.recipe.train.batch_size,
            sampler=self._train_sampler,
            drop_last=False,
            progress=self._progress,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []
        return self.eval_dataloader("val")

    def eval_dataloader(self, split: str) -> DataLoader:
        """An in-order loader over one split (every process sees all of it)."""
        return DataLoader(self.datasets[split], batch_size=self.recipe.train.batch_size, shuffle=False, **self._loader_kwargs())
