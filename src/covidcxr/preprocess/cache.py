"""The preprocessing cache: model inputs on disk, keyed by image content and config.

Layout (``<hash16>`` = the first 16 hex digits of `PreprocessConfig.config_hash`)::

    CACHE/<hash16>/config.json          the resolved config, its full hash, PIPELINE_VERSION
    CACHE/<hash16>/config.yaml          the same config as YAML (readable by --config)
    CACHE/<hash16>/<key[:2]>/<key>.npz  one image: arrays + metadata
    CACHE/<hash16>/index.parquet        the manifest rows + cache file + QC numbers + rejection

**Key.** ``key`` is the SHA-1 of the image file's bytes, recomputed here from the file
actually read — never taken from the manifest, whose ``sha1`` may describe another file
(the shared collection's is that of the *original* download, before conversion to PNG).
Hashing costs ~1 ms per MB, small next to decoding. When the lung mask comes from the
manifest, the mask file is an input too, so the key becomes
``sha1("<image sha1>+<mask sha1>")``: an edited mask is a miss, not a stale hit. The
index's ``cache_key`` column holds the key of every row; ``file_sha1`` the image's own.

**Entry** (``np.savez_compressed``):

* ``image``: the model input as **float16**. On [0, 1] its spacing is at most 2⁻¹¹ ≈
  0.0005 (rounding error ≤ 0.00025), below the 8-bit step of 1/255 of most sources, so
  nothing a network could use is lost, while the soft mask edge and Lanczos resampling
  keep values between 8-bit levels that uint8 would round away (the 3-px blur would turn
  into steps); half the bytes of float32. `load_cached` returns float32.
* ``lung_mask``: bool, output geometry.
* ``qc_original`` (uint8) and ``qc_mask`` (bool): the equalised full image and its mask
  at a long side of 192 px, so the QC sheet needs no recomputation.
* ``meta``: JSON (mask area fraction, left/right balance, crop box, rejection reason,
  which mask was used, shapes, hashes, ``cache_mode``).

**Model resolution only** (``cache_mode="model_only"``; ``preprocess.cache: model_only`` in a
recipe, ``covidcxr preprocess --cache model_only``): the entry holds ``image``, ``lung_mask``
and ``meta`` but not the QC thumbnails, which are most of an entry's bytes at 224² (see the
README's scaling section for bytes per image). Training, evaluation and prediction read
only the model input; the QC table's lung height ratio and possible-opacity-cut flag and
the contact sheet's original/mask tiles need the thumbnails, and `covidcxr.preprocess.qc`
says they are unavailable for such entries (`CachedImage.qc_unavailable`). A ``full`` run
finding a ``model_only`` entry recomputes it (a miss, not damage); a ``model_only`` run
uses a ``full`` entry as it is. The mode is not part of the config hash: both hold the same
model input.

Rejected images (empty mask, crop too small) are cached too, with their reason, so a
resumed run does not redo them; unreadable files, and files that are not chest
radiographs (`covidcxr.preprocess.screening`: colour photographs, test patterns, blank
frames...), are not: they are reported with the reason each run and never trained on.

**Writes** go through `covidcxr.io.atomic_path` (fsynced before the rename): an entry
exists complete or not at all, so a killed run loses only its in-flight images and the
next run counts the rest as hits. **Damage** from outside (a disk error, a copy cut short,
a file system that lost unsynced data) is detected at look-up — an entry that is empty,
not a complete zip, or lacks one of the arrays — named in `PreprocessResult.rebuilt`
and recomputed; temporary files a killed writer left behind are removed once they are
`STALE_TEMP_SECONDS` old.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.data.manifest import file_sha1, is_missing
from covidcxr.data.sources import Rejection
from covidcxr.errors import CovidCXRError, ImageReadError
from covidcxr.io import atomic_path, atomic_write_text, clean_stale_temps
from covidcxr.parallel import default_workers, make_progress
from covidcxr.preprocess.pipeline import (
    PIPELINE_VERSION,
    PreprocessConfig,
    PreprocessedImage,
    Segmenter,
    mask_origin,
    preprocess_batch,
)

log = logging.getLogger("covidcxr.preprocess")

# Columns this module adds to the manifest in ``index.parquet`` (and the QC table).
INDEX_COLUMNS: tuple[str, ...] = (
    "cache_key",
    "cache_file",
    "cache_status",
    "file_sha1",
    "mask_used",
    "mask_area_fraction",
    "left_right_balance",
    "crop_top",
    "crop_left",
    "crop_bottom",
    "crop_right",
    "rejected_reason",
)


#: The arrays every entry holds (`save_entry`).
MODEL_ARRAYS: tuple[str, ...] = ("image", "lung_mask", "meta")
#: The QC thumbnails a ``full`` entry holds besides.
QC_ARRAYS: tuple[str, ...] = ("qc_original", "qc_mask")
ENTRY_ARRAYS: tuple[str, ...] = ("image", "lung_mask", "qc_original", "qc_mask", "meta")
#: What an entry stores: everything (``full``, the default) or the model input and its mask only.
CACHE_MODES: tuple[str, ...] = ("full", "model_only")
#: A temporary entry file untouched this long belongs to a killed writer (one entry takes milliseconds to write).
STALE_TEMP_SECONDS = 15 * 60
# What np.load / zipfile raise for a damaged .npz: 0 bytes is EOFError, a truncated zip BadZipFile, ...
_DAMAGED = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


class CacheMiss(CovidCXRError):
    """No (readable) cache entry for a key under a config."""


@dataclass(eq=False)
class CachedImage:
    """One cache entry, as `load_cached` returns it.

    Attributes:
        image: ``config.size`` float32 in [0, 1], the model input.
        lung_mask: ``config.size`` bool, the lung mask in the model input's geometry.
        qc_original: ``(h, w)`` float32, the equalised full image (long side 192); None in
            a ``model_only`` entry (see `qc_unavailable`).
        qc_mask: ``(h, w)`` bool, its lung mask; None in a ``model_only`` entry.
        meta: the entry's metadata (see `PreprocessedImage`): ``mask_area_fraction``,
            ``left_right_balance``, ``crop_box``, ``rejected_reason``, ``mask_used``, ...
    """

    image: np.ndarray
    lung_mask: np.ndarray
    qc_original: np.ndarray | None
    qc_mask: np.ndarray | None
    meta: dict[str, Any]

    @property
    def rejected_reason(self) -> str | None:
        return self.meta.get("rejected_reason")

    @property
    def qc_unavailable(self) -> str | None:
        """Why the QC thumbnails are absent (a sentence for QC outputs), or None when they are here."""
        if self.qc_original is not None and self.qc_mask is not None:
            return None
        return (
            "QC thumbnails not cached (cache_mode model_only): run `covidcxr preprocess` "
            "without `--cache model_only` to get them"
        )


@dataclass
class PreprocessResult:
    """What `preprocess_collection` returns.

    Attributes:
        index: the manifest's rows in order, plus `INDEX_COLUMNS` (``cache_status`` is
            ``hit``, ``miss`` or ``error``; ``cache_file`` is relative to ``config_dir``
            and missing for unreadable images).
        rejected: every image that must not be used, with its reason: unreadable files
            and masks, missing manifest masks, empty masks, crops too small.
        rebuilt: damaged entries found (empty, truncated, missing arrays), each as
            ``"<entry file>: <what was wrong>"``; they were recomputed in this run.
        stale_temps_removed: temporary files of killed writers removed from the cache.
        hits: entries found in the cache.
        misses: entries computed in this run.
        errors: images that could not be processed at all (unreadable).
        seconds: wall-clock time of the run.
        config_dir: ``CACHE/<hash16>``.
    """

    index: pd.DataFrame
    rejected: list[Rejection]
    hits: int
    misses: int
    errors: int
    seconds: float
    config_dir: Path
    rebuilt: list[str] = field(default_factory=list)
    stale_temps_removed: int = 0

    @property
    def processed(self) -> int:
        return int(len(self.index))

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("inf")


def config_dir(cache_dir: str | Path, config: PreprocessConfig) -> Path:
    """``cache_dir/<first 16 hex digits of the config hash>`` (64 bits: no collision in practice)."""
    return Path(cache_dir) / config.config_hash()[:16]


def entry_path(directory: Path, key: str) -> Path:
    """Where the entry for ``key`` lives under a config directory (256 sub-folders by prefix)."""
    return directory / key[:2] / f"{key}.npz"


def combined_key(image_sha1: str, mask_sha1: str | None) -> str:
    """The cache key: the image's SHA-1, or a SHA-1 of both when the manifest's mask is used.

    Example:
        >>> combined_key("ab" * 20, None) == "ab" * 20
        True
    """
    if mask_sha1 is None:
        return image_sha1
    return hashlib.sha1(f"{image_sha1}+{mask_sha1}".encode("ascii")).hexdigest()


def write_config_files(directory: Path, config: PreprocessConfig) -> None:
    """Write ``config.json`` (fields + hash + version) and ``config.yaml`` (timm-style) atomically."""
    payload = {
        "config": config.model_dump(mode="json"),
        "config_hash": config.config_hash(),
        "pipeline_version": PIPELINE_VERSION,
    }
    atomic_write_text(directory / "config.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(
        directory / "config.yaml",
        f"# covidcxr preprocess config, hash {config.config_hash()}, pipeline version {PIPELINE_VERSION}\n" + config.to_yaml(),
    )


def _meta(result: PreprocessedImage, key: str, image_sha1: str, mask_sha1: str | None, config: PreprocessConfig) -> dict[str, Any]:
    balance = result.left_right_balance
    transform = result.transform
    return {
        "key": key,
        "file_sha1": image_sha1,
        "mask_sha1": mask_sha1,
        "mask_used": result.mask_used,
        "config_hash": config.config_hash(),
        "pipeline_version": PIPELINE_VERSION,
        "input_shape": list(result.input_shape),
        "mask_area_fraction": result.mask_area_fraction,
        "left_right_balance": None if np.isnan(balance) else balance,
        "crop_box": None if result.crop_box is None else list(result.crop_box.as_tuple()),
        "content_box": list(transform.content_box.as_tuple()),
        "rejected_reason": result.rejected_reason,
    }


def save_entry(path: Path, result: PreprocessedImage, meta: dict[str, Any], cache_mode: str = "full") -> None:
    """Write one entry atomically (see the module docstring for the arrays; ``model_only`` omits the QC ones)."""
    arrays: dict[str, np.ndarray] = {"image": result.image.astype(np.float16), "lung_mask": result.lung_mask.astype(bool)}
    if cache_mode == "full":
        arrays["qc_original"] = np.round(np.clip(result.original, 0.0, 1.0) * 255).astype(np.uint8)
        arrays["qc_mask"] = result.original_mask.astype(bool)
    arrays["meta"] = np.array(json.dumps({**meta, "cache_mode": cache_mode}))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def check_entry(path: Path) -> dict[str, Any]:
    """An entry's metadata, after checking the file is a complete entry (cheap: the zip directory and ``meta``).

    Raises:
        CacheMiss: naming the file and what is wrong (empty, not a complete zip, an array missing).
    """
    try:
        if path.stat().st_size == 0:
            raise CacheMiss(f"cache entry {path} is empty (0 bytes)")
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in MODEL_ARRAYS if name not in data.files]
            if missing:
                raise CacheMiss(f"cache entry {path} lacks the array(s) {missing}")
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict):
                raise CacheMiss(f"cache entry {path} has metadata that is not a JSON object")
            # entries written before cache modes existed hold everything
            missing = [name for name in QC_ARRAYS if name not in data.files] if meta.get("cache_mode", "full") == "full" else []
            if missing:
                raise CacheMiss(f"cache entry {path} lacks the array(s) {missing}")
    except _DAMAGED as exc:
        raise CacheMiss(f"cache entry {path} is damaged ({type(exc).__name__}: {exc})") from None
    return meta


def read_entry(path: str | Path) -> CachedImage:
    """Read one entry file.

    Raises:
        CacheMiss: the file is absent or unreadable.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            has_qc = all(name in data.files for name in QC_ARRAYS)
            return CachedImage(
                image=data["image"].astype(np.float32),
                lung_mask=data["lung_mask"].astype(bool),
                qc_original=data["qc_original"].astype(np.float32) / 255.0 if has_qc else None,
                qc_mask=data["qc_mask"].astype(bool) if has_qc else None,
                meta=json.loads(str(data["meta"])),
            )
    except _DAMAGED as exc:
        raise CacheMiss(
            f"no readable cache entry {path} ({type(exc).__name__}: {exc}); run `covidcxr preprocess` again to rebuild it"
        ) from None


def load_cached(cache_dir: str | Path, config: PreprocessConfig, key: str) -> CachedImage:
    """The cached arrays of one image, for training and QC.

    Args:
        cache_dir: the cache root given to `preprocess_collection`.
        config: the config the cache was made with.
        key: the index's ``cache_key`` — the image file's SHA-1 when its mask came from
            the model (``mask_source="model"``), a combined hash when from the manifest.

    Returns:
        A `CachedImage` (float32 image, bool mask, QC thumbnails, metadata). Check
        ``rejected_reason`` (or the index's column) before training on it.

    Raises:
        CacheMiss: no entry for ``key`` under this config.

    Example:
        >>> result = preprocess_collection(manifest, config, "cache")  # doctest: +SKIP
        >>> row = result.index.iloc[0]  # doctest: +SKIP
        >>> load_cached("cache", config, row.cache_key).image.shape  # doctest: +SKIP
        (224, 224)
    """
    return read_entry(entry_path(config_dir(cache_dir, config), key))


# ---------------------------------------------------------------- workers

# Per-process state of a worker (or of the parent when it runs with one worker).
_STATE: dict[str, Any] = {}


def _init_worker(
    config_json: str, directory: str, segmenter: Segmenter | None, torch_threads: int | None, cache_mode: str = "full"
) -> None:
    _STATE.clear()
    _STATE.update(
        config=PreprocessConfig.model_validate_json(config_json), directory=Path(directory), segmenter=segmenter, cache_mode=cache_mode
    )
    if torch_threads is not None:
        # Each of N workers on C cores gets C/N intra-op threads: oversubscribing 2 cores
        # with 2 processes × 2 threads makes the U-Net slower, not faster.
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_threads)
        _STATE["torch_threads"] = torch_threads


def _segmenter() -> Segmenter:
    if _STATE.get("segmenter") is None:
        from covidcxr.preprocess.pipeline import load_segmenter

        _STATE["segmenter"] = load_segmenter(_STATE["config"].segmenter_weights)
        if _STATE.get("torch_threads") and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(_STATE["torch_threads"])
    return _STATE["segmenter"]


def _outcome(position: int, status: str, **values: Any) -> dict[str, Any]:
    return {"position": position, "cache_status": status, **values}


def _from_meta(position: int, status: str, key: str, path: Path, meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    box = meta.get("crop_box") or [None] * 4
    balance = meta.get("left_right_balance")
    return _outcome(
        position,
        status,
        cache_key=key,
        cache_file=path.relative_to(directory).as_posix(),
        file_sha1=meta.get("file_sha1"),
        mask_used=meta.get("mask_used"),
        mask_area_fraction=meta.get("mask_area_fraction"),
        left_right_balance=float("nan") if balance is None else balance,
        crop_top=box[0],
        crop_left=box[1],
        crop_bottom=box[2],
        crop_right=box[3],
        rejected_reason=meta.get("rejected_reason"),
    )


def _hash_or_error(path: str) -> str:
    try:
        return file_sha1(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file: {exc.strerror or exc}") from None


# A miss to compute: (position, image path, manifest mask path or None, image sha1, mask sha1, key).
_Todo = tuple[int, str, str | None, str, str | None, str]


def _look_up(
    job: tuple[int, str, str | None], config: PreprocessConfig, directory: Path, damaged: list[str], cache_mode: str = "full"
) -> dict[str, Any] | _Todo:
    """Hash one image (and its manifest mask) and find its entry: an outcome (hit/error) or a miss to compute.

    A damaged entry is appended to ``damaged`` (list.append is thread-safe) and computed again;
    a ``model_only`` entry is a plain miss for a ``full`` run.
    """
    position, image, mask = job
    try:
        origin = mask_origin(config, mask)
        image_sha1 = _hash_or_error(image)
        mask_sha1 = _hash_or_error(mask) if origin == "manifest" else None
    except CovidCXRError as exc:
        return _outcome(position, "error", rejected_reason=str(exc))
    key = combined_key(image_sha1, mask_sha1)
    path = entry_path(directory, key)
    if path.is_file():
        try:
            meta = check_entry(path)
            if cache_mode == "model_only" or meta.get("cache_mode", "full") == "full":
                return _from_meta(position, "hit", key, path, meta, directory)
        except CacheMiss as exc:
            damaged.append(str(exc))  # named in the result, then recomputed and overwritten
    return (position, image, mask if origin == "manifest" else None, image_sha1, mask_sha1, key)


def _compute_chunk(todo: Sequence[_Todo]) -> list[dict[str, Any]]:
    """Preprocess a few misses (one segmenter batch) and write their entries; runs in a worker."""
    config: PreprocessConfig = _STATE["config"]
    directory: Path = _STATE["directory"]
    needs_model = any(item[2] is None for item in todo)
    results = preprocess_batch([(item[1], item[2]) for item in todo], config, _segmenter() if needs_model else None, screen=True)
    done: list[dict[str, Any]] = []
    for (position, _, _, image_sha1, mask_sha1, key), result in zip(todo, results):
        if isinstance(result, CovidCXRError):
            done.append(_outcome(position, "error", file_sha1=image_sha1, rejected_reason=str(result)))
            continue
        meta = _meta(result, key, image_sha1, mask_sha1, config)
        path = entry_path(directory, key)
        save_entry(path, result, meta, _STATE.get("cache_mode", "full"))
        done.append(_from_meta(position, "miss", key, path, meta, directory))
    return done


def _chunks(jobs: list[_Todo], size: int) -> list[list[_Todo]]:
    return [jobs[start : start + size] for start in range(0, len(jobs), size)]


def preprocess_collection(
    manifest: pd.DataFrame,
    config: PreprocessConfig,
    cache_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    segmenter: Segmenter | None = None,
    batch_size: int = 8,
    cache_mode: str = "full",
) -> PreprocessResult:
    """Preprocess every manifest row into the cache, in parallel, resuming from what is there.

    First every file is hashed and looked up in this process (threads); existing entries
    are hits and are not recomputed, so a killed run resumes where it stopped and a warm
    run starts no worker at all. The misses then go to ``workers`` forked processes,
    ``batch_size`` images per task; each worker loads the lung U-Net once (only if a miss
    needs it) and segments a task's images in one batch. Images that cannot be used are
    reported in ``rejected`` with the reason, and the run goes on.

    Args:
        manifest: a canonical manifest (``image`` and, for ``mask_source`` manifest/auto,
            ``mask`` columns are used; all columns are kept in the index).
        config: the pipeline settings.
        cache_dir: the cache root (entries go under ``cache_dir/<hash16>/``).
        workers: processes; None = every available core, 1 = this process.
        progress: show a rich progress bar.
        segmenter: a loaded segmenter to use instead of ``LungSegmenter.load``; it must
            pickle when ``workers > 1`` (tests inject a stand-in here).
        batch_size: images per worker task (= per segmenter batch).
        cache_mode: ``"full"`` (model input + QC thumbnails) or ``"model_only"`` (the model
            input and its lung mask only; see the module docstring).

    Returns:
        A `PreprocessResult`; ``index.parquet`` is also written under ``config_dir``.

    Example:
        >>> from covidcxr.data.sources import load_source
        >>> manifest = load_source("phantoms").manifest  # doctest: +SKIP
        >>> config = PreprocessConfig(mask_source="manifest")
        >>> result = preprocess_collection(manifest, config, "cache", workers=2)  # doctest: +SKIP
        >>> result.hits, result.misses, [r.reason for r in result.rejected]  # doctest: +SKIP
        (0, 300, [])
    """
    if cache_mode not in CACHE_MODES:
        raise CovidCXRError(f"cache mode must be one of {', '.join(CACHE_MODES)}, not {cache_mode!r}")
    start = time.perf_counter()
    directory = config_dir(cache_dir, config)
    directory.mkdir(parents=True, exist_ok=True)
    stale = clean_stale_temps(directory, min_age_s=STALE_TEMP_SECONDS, recursive=True)
    damaged: list[str] = []
    write_config_files(directory, config)
    manifest = manifest.reset_index(drop=True)
    masks = manifest["mask"] if "mask" in manifest.columns else pd.Series([None] * len(manifest))
    jobs = [
        (position, str(image), None if is_missing(mask) else str(mask))
        for position, (image, mask) in enumerate(zip(manifest["image"], masks))
    ]
    outcomes: list[dict[str, Any]] = []
    with make_progress() as bar:
        task = bar.add_task("preprocessing", total=len(jobs), visible=progress)
        # 1. Look-up, in this process: hashing is I/O and hashlib (both release the GIL),
        #    so threads suffice, and a warm run never pays for starting worker processes.
        todo: list[_Todo] = []
        with ThreadPoolExecutor(max_workers=4) as threads:
            for found in threads.map(lambda job: _look_up(job, config, directory, damaged, cache_mode), jobs):
                if isinstance(found, dict):
                    outcomes.append(found)
                    bar.advance(task)
                else:
                    todo.append(found)
        # 2. Compute the misses on worker processes, batch_size images per task.
        chunks = _chunks(todo, max(1, batch_size))
        workers = default_workers() if workers is None else max(1, int(workers))
        workers = min(workers, max(1, len(chunks)))
        if workers > 1 and (any(item[2] is None for item in todo) or (config.lungs == "mask" and config.blur_radius > 0)):
            # Import the lungs module (and torch, ~1 s) once here rather than in every
            # forked worker: it holds the U-Net and `soften_mask`.
            try:
                import covidcxr.preprocess.lungs  # noqa: F401
            except ImportError:
                pass  # the workers report it, naming what is missing
        # Workers are forked (Linux's default: no re-import, no __main__ guard needed in
        # the caller's script). If this process has torch loaded, its OpenMP pool may have
        # run, and GNU OpenMP hangs in a forked child that uses more than one thread —
        # so those children get one thread each, as torch's own DataLoader workers do.
        if workers == 1:
            torch_threads = None
        elif "torch" in sys.modules:
            torch_threads = 1
        else:
            torch_threads = max(1, default_workers() // workers)
        init_args = (config.model_dump_json(), str(directory), segmenter, torch_threads, cache_mode)
        if chunks and workers == 1:
            _init_worker(*init_args)
            for chunk in chunks:
                outcomes.extend(_compute_chunk(chunk))
                bar.advance(task, len(chunk))
        elif chunks:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init_args)
            try:
                pending: dict[Future, int] = {pool.submit(_compute_chunk, chunk): len(chunk) for chunk in chunks}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        outcomes.extend(future.result())
                        bar.advance(task, pending.pop(future))
            finally:
                # On Ctrl-C or a bug, do not start queued chunks; what was written stays.
                pool.shutdown(wait=True, cancel_futures=True)
    for line in damaged[:10]:  # said where it happens, so `train` names them too (once `preprocess` has, it is quiet)
        log.warning("rebuilt a damaged %s", line.removeprefix("cache entry "))
    if len(damaged) > 10:
        log.warning("... and %d more damaged cache entries rebuilt", len(damaged) - 10)
    if stale:
        log.warning("removed %d temporary file(s) left in %s by killed writers", len(stale), directory)
    outcomes.sort(key=lambda o: o["position"])
    index = _build_index(manifest, outcomes)
    with atomic_path(directory / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False)
    rejected = [
        Rejection(str(row.image), str(row.rejected_reason))
        for row in index[["image", "rejected_reason"]].itertuples(index=False)
        if not is_missing(row.rejected_reason)
    ]
    status = index["cache_status"].value_counts()
    return PreprocessResult(
        index=index,
        rejected=rejected,
        hits=int(status.get("hit", 0)),
        misses=int(status.get("miss", 0)),
        errors=int(status.get("error", 0)),
        seconds=time.perf_counter() - start,
        config_dir=directory,
        rebuilt=sorted(damaged),
        stale_temps_removed=len(stale),
    )


def _build_index(manifest: pd.DataFrame, outcomes: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(outcomes).set_index("position").reindex(range(len(manifest)))
    index = manifest.drop(columns=[c for c in INDEX_COLUMNS if c in manifest.columns]).copy()
    for column in INDEX_COLUMNS:
        values = table[column] if column in table.columns else pd.Series([None] * len(manifest))
        index[column] = values.to_numpy()
    for column in ("crop_top", "crop_left", "crop_bottom", "crop_right"):
        index[column] = pd.array(pd.to_numeric(index[column]), dtype="Int64")
    for column in ("mask_area_fraction", "left_right_balance"):
        index[column] = pd.to_numeric(index[column]).astype("float64")
    for column in ("cache_key", "cache_file", "cache_status", "file_sha1", "mask_used", "rejected_reason"):
        index[column] = index[column].map(lambda v: None if is_missing(v) else str(v)).astype("object")
    return index


def read_index(cache_dir: str | Path, config: PreprocessConfig) -> pd.DataFrame:
    """The ``index.parquet`` of the last `preprocess_collection` run under ``config``.

    Raises:
        CacheMiss: no index yet.
    """
    path = config_dir(cache_dir, config) / "index.parquet"
    if not path.is_file():
        raise CacheMiss(f"{path} does not exist; run `covidcxr preprocess` first")
    return pd.read_parquet(path)
