"""Near-duplicate images: fingerprints, pairs and the manifest's ``dup_group`` column.

The public COVID collections hold the same radiograph several times — re-encoded,
re-scaled, re-cropped, sometimes under another patient id (the Cohen collection copies
figures from papers that reuse each other's images). A near-duplicate on both sides of a
train/test split inflates every metric, so splits keep duplicate groups together and the
leakage check (`covidcxr.data.splits.check_leakage`) treats a crossing as an error.

A pair is a near-duplicate when either

* their 256-bit perceptual hashes (DCT hash, `imagehash.phash` with ``hash_size=16``) are
  within `DEFAULT_MAX_HASH_DISTANCE` bits — robust to re-encoding and re-scaling; or
* their zero-mean 32×32 area-averaged thumbnails correlate at `DEFAULT_MIN_THUMBNAIL_CORRELATION`
  or more *and* the hashes are within `DEFAULT_MAX_HASH_DISTANCE_CORRELATED` bits —
  catches windowing and slight cropping changes that move the hash further.

Calibrated on ``../shared/data/cxr`` (2521 images, 3.2 M pairs, 21 curated duplicate pairs
found there by ORB keypoint matching): the rule finds 16 of the 21 pairs and flags no
other pair. Of the 5 missed, 3 are pairs of the same patient (kept together by the
patient grouping anyway) and 2 are heavily re-cropped copies, which only keypoint
matching finds. Mirrored copies are not detected. The phantoms of `covidcxr.data.synth`
are more alike than real radiographs: 1 of the 45 000 pairs of different patients among
300 phantoms is flagged.

Above `ALL_PAIRS_UP_TO` images, the search (`near_duplicate_pairs`) uses two faiss indexes
instead of comparing all pairs (``method="index"``):

* **multi-index hashing** (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with
  Multi-Index Hashing", CVPR 2012; `faiss.IndexBinaryMultiHash`) over the 256-bit hash for
  the first rule: the bits are cut into 13 substrings of interleaved bits; two hashes within
  24 bits differ in at most 1 bit of at least one substring (pigeonhole), so probing each
  substring's table at radius 1 misses no pair: exact. Its candidates are the pairs sharing
  a substring up to one bit, whose number grows with how alike the collection's hashes are
  (on the synthetic benchmark, faster than the number of images);
* an **inverted file** (`faiss.IndexIVFFlat`) over an orthonormal projection of the unit-norm
  thumbnails for the second rule: correlation ≥ 0.97 means Euclidean distance ≤ √(2·0.03),
  and an orthonormal projection never lengthens a distance, so every such pair lies within
  that radius in the projection; each image is compared with the images of its 32 nearest
  k-means cells (a fixed amount of work per image). This search is approximate (a copy in a
  cell not probed is missed); it found every pair of the exact search on ../shared/data/cxr
  and on 10k, 30k and 100k synthetic fingerprints with planted copies.

They replaced a k-d tree over a 16-d projection (exact, but 373 s at 100k synthetic fingerprints
under load, 23× its 10k time: k-d trees degrade in 16 dimensions) and numpy multi-index hashing
(69 s at 100k). Figures: the README's scaling table (`benchmarks/bench_data_scale.py`).
Each candidate is then checked with the full rule. Fingerprints are cached on disk
(`FingerprintCache`, keyed by path, size and modification time) and reused by
``data summarize``, ``data manifest`` and ``data split``.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from covidcxr.data.manifest import file_sha1, is_missing
from covidcxr.data.sources.base import Rejection
from covidcxr.parallel import map_items

HASH_SIZE = 16  # 16×16 DCT bits = 256-bit hash
THUMBNAIL_SIZE = 32
DEFAULT_MAX_HASH_DISTANCE = 24  # of 256 bits
DEFAULT_MIN_THUMBNAIL_CORRELATION = 0.97
DEFAULT_MAX_HASH_DISTANCE_CORRELATED = 48
# Up to this many images `near_duplicate_pairs` compares all pairs (quicker than building the indexes).
ALL_PAIRS_UP_TO = 4000


@dataclass(frozen=True)
class Fingerprints:
    """Per-image fingerprints, row-aligned with a manifest.

    Attributes:
        hashes: ``(N, 4)`` uint64 — the 256-bit perceptual hash of each image.
        thumbnails: ``(N, 32*32)`` — the 8-bit thumbnails (uint8, as cached; `fingerprint_images`
            returns them memory-mapped for large collections) or zero-mean, unit-norm float32
            ones. Comparisons normalise uint8 rows as they read them (`unit_thumbnails`).
        valid: ``(N,)`` bool — False where the image could not be read (no fingerprint).
    """

    hashes: np.ndarray
    thumbnails: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.valid)

    def save(self, path: str | Path) -> None:
        """Save to a ``.npz`` file (atomically)."""
        from covidcxr.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, hashes=self.hashes, thumbnails=self.thumbnails, valid=self.valid)

    @classmethod
    def load(cls, path: str | Path) -> Fingerprints:
        with np.load(path) as data:
            return cls(data["hashes"], data["thumbnails"], data["valid"])


def fingerprint(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprint one image.

    Args:
        pixels: ``(H, W)`` float image in [0, 1].

    Returns:
        ``(hash, thumbnail)``: ``(4,)`` uint64 and ``(1024,)`` float32 (zero mean, unit norm).
    """
    packed, raw = _raw_fingerprint(pixels)
    return packed, normalise_thumbnails(raw[None])[0]


def _raw_fingerprint(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hash, thumbnail)`` with the thumbnail as the 8-bit 32×32 image it is (what the cache stores)."""
    grey = Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8))
    bits = imagehash.phash(grey, hash_size=HASH_SIZE).hash.reshape(-1)
    packed = np.packbits(bits).view(">u8").astype(np.uint64)
    thumbnail = np.asarray(grey.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX), dtype=np.uint8).ravel()
    return packed, thumbnail


def normalise_thumbnails(raw: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm float32 thumbnails from ``(N, 1024)`` 8-bit ones (flat ones stay all-zero).

    Example:
        >>> normalise_thumbnails(np.full((1, 1024), 7, np.uint8)).any()
        np.False_
    """
    out = np.zeros(raw.shape, np.float32)
    for start in range(0, len(raw), 8192):  # in blocks: float copies of 100k thumbnails stay small
        block = raw[start : start + 8192].astype(np.float32)
        block -= block.mean(axis=1, keepdims=True)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        # A flat image has no shape to compare: leave it all-zero so it correlates with nothing.
        shaped = norms > 1e-6
        out[start : start + 8192][shaped] = block[shaped] / norms[shaped, None]
    return out


def _fingerprint_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    from covidcxr.io import read_image

    return _raw_fingerprint(read_image(path).pixels)


def default_fingerprint_cache() -> Path:
    """Where the fingerprint cache lives: ``$COVIDCXR_CACHE_DIR/fingerprints.sqlite``, else ``.cache/covidcxr/``.

    Beside the preprocessing cache (``.cache/covidcxr/``, relative to the working
    directory), never inside a collection, which may be read-only or shared.
    """
    return Path(os.environ.get("COVIDCXR_CACHE_DIR", ".cache/covidcxr")) / "fingerprints.sqlite"


class FingerprintCache:
    """Fingerprints on disk (SQLite), keyed by a file's absolute path, size and modification time.

    A file whose size or ``mtime_ns`` changed is fingerprinted again; an unreadable file is
    cached with its reason, so a rerun reports it without decoding it again. Thumbnails
    are stored as the 8-bit 32×32 image (1 KB), so 100k images take ~110 MB. SQLite
    transactions make each batch of writes atomic, and several processes may share a file.

    Example:
        >>> cache = FingerprintCache("/tmp/fp.sqlite")  # doctest: +SKIP
        >>> prints, rejected = fingerprint_images(paths, cache=cache)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=120)
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS fingerprints (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "hash BLOB, thumbnail BLOB, error TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS sha1s (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha1 TEXT)")
        self._pending_sha1: list[tuple[str, int, int, str]] = []

    @staticmethod
    def key(path: str) -> tuple[str, int, int] | None:
        """``(absolute path, size, mtime_ns)`` of a file, or None when it cannot be stat-ed."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return os.path.abspath(path), stat.st_size, stat.st_mtime_ns

    def get(self, key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray] | str | None:
        """The cached ``(hash, raw thumbnail)`` or error text for a key, or None on a miss."""
        row = self._db.execute(
            "SELECT hash, thumbnail, error FROM fingerprints WHERE path = ? AND size = ? AND mtime_ns = ?", key
        ).fetchone()
        if row is None:
            return None
        if row[2] is not None:
            return str(row[2])
        return np.frombuffer(row[0], dtype=np.uint64).copy(), np.frombuffer(row[1], dtype=np.uint8).copy()

    def put_many(self, entries: Sequence[tuple[tuple[str, int, int], tuple[np.ndarray, np.ndarray] | str]]) -> None:
        """Store ``(key, (hash, raw thumbnail) or error text)`` entries in one transaction."""
        rows = []
        for (path, size, mtime), value in entries:
            if isinstance(value, str):
                rows.append((path, size, mtime, None, None, value))
            else:
                rows.append((path, size, mtime, value[0].astype(np.uint64).tobytes(), value[1].astype(np.uint8).tobytes(), None))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?, ?, ?)", rows)

    def sha1(self, path: str | Path) -> str:
        """The SHA-1 of a file's bytes (the manifest's ``sha1``), from the cache when the file is unchanged.

        New digests are written by `flush` (`close` flushes), in one transaction.
        """
        key = self.key(str(path))
        if key is not None:
            row = self._db.execute("SELECT sha1 FROM sha1s WHERE path = ? AND size = ? AND mtime_ns = ?", key).fetchone()
            if row is not None:
                return str(row[0])
        digest = file_sha1(path)
        if key is not None:
            self._pending_sha1.append((*key, digest))
        return digest

    def flush(self) -> None:
        """Write the SHA-1 digests computed since the last flush."""
        if self._pending_sha1:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO sha1s VALUES (?, ?, ?, ?)", self._pending_sha1)
            self._pending_sha1 = []

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM fingerprints").fetchone()[0])

    def close(self) -> None:
        self.flush()
        self._db.close()


# From this many images `fingerprint_images` keeps the 8-bit thumbnails in a memory-mapped temporary file.
MEMMAP_FROM = 10_000


def thumbnail_store(count: int, memmap_from: int = MEMMAP_FROM) -> np.ndarray:
    """A zeroed ``(count, 1024)`` uint8 array for 8-bit thumbnails: in memory, or from ``memmap_from`` rows on disk.

    The disk copy is an anonymous temporary file (deleted once the array is released), so
    100k thumbnails (100 MB) live in the page cache, which the OS can evict, not in the
    process's own memory.
    """
    shape = (count, THUMBNAIL_SIZE * THUMBNAIL_SIZE)
    if count < memmap_from:
        return np.zeros(shape, np.uint8)
    with tempfile.TemporaryFile(prefix="covidcxr-thumbnails-") as handle:  # the map outlives the closed file
        return np.memmap(handle, dtype=np.uint8, mode="w+", shape=shape)


def fingerprint_images(
    paths: Sequence[str],
    workers: int | None = None,
    show_progress: bool = True,
    cache: FingerprintCache | str | Path | None = None,
    batch: int = 4096,
    memmap_from: int = MEMMAP_FROM,
) -> tuple[Fingerprints, list[Rejection]]:
    """Read and fingerprint many images in parallel, reusing cached fingerprints, ``batch`` files at a time.

    Memory stays bounded as the collection grows: files are looked up and decoded one
    batch at a time, and the 8-bit thumbnails go to `thumbnail_store` (a memory map from
    ``memmap_from`` images); the only per-image arrays in memory are the 32-byte hashes.

    Args:
        paths: the image files.
        workers: processes for decoding; None uses every available core.
        show_progress: draw a progress bar.
        cache: a `FingerprintCache` (or its file); None fingerprints everything afresh.
        batch: files looked up, decoded and written to the cache at once (a crash loses at most one batch).
        memmap_from: from this many images the thumbnails are memory-mapped.

    Returns:
        The `Fingerprints` (row-aligned with ``paths``; uint8 thumbnails) and one `Rejection`
        per unreadable image, with the reason.
    """
    paths = [str(p) for p in paths]
    count = len(paths)
    if isinstance(cache, (str, Path)):
        cache = FingerprintCache(cache)
    hashes = np.zeros((count, HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)
    raw = thumbnail_store(count, memmap_from)
    valid = np.zeros(count, dtype=bool)
    errors: dict[int, str] = {}

    def record(index: int, value: tuple[np.ndarray, np.ndarray] | str) -> None:
        if isinstance(value, str):
            errors[index] = value
        else:
            hashes[index], raw[index] = value
            valid[index] = True

    for start in range(0, count, batch):
        positions = range(start, min(start + batch, count))
        keys = {index: FingerprintCache.key(paths[index]) for index in positions} if cache is not None else {}
        missing = []
        for index in positions:
            hit = cache.get(keys[index]) if cache is not None and keys[index] is not None else None
            if hit is None:
                missing.append(index)
            else:
                record(index, hit)
        if not missing:
            continue
        outcomes = map_items(
            _fingerprint_file, [paths[i] for i in missing], workers=workers, description="fingerprinting", show_progress=show_progress
        )
        fresh = []
        for index, outcome in zip(missing, outcomes):
            value = outcome.result if outcome.ok else (outcome.error or "unreadable")
            record(index, value)
            if keys.get(index) is not None:
                fresh.append((keys[index], value))
        if cache is not None and fresh:
            cache.put_many(fresh)
    rejected = [Rejection(paths[i], errors[i]) for i in sorted(errors)]
    return Fingerprints(hashes, raw, valid), rejected


def near_duplicate_pairs(
    prints: Fingerprints,
    max_hash_distance: int = DEFAULT_MAX_HASH_DISTANCE,
    min_correlation: float = DEFAULT_MIN_THUMBNAIL_CORRELATION,
    max_hash_distance_correlated: int = DEFAULT_MAX_HASH_DISTANCE_CORRELATED,
    block: int = 256,
    method: str = "auto",
) -> pd.DataFrame:
    """All pairs ``i < j`` of near-duplicate images.

    Args:
        prints: the fingerprints, ``N`` rows.
        max_hash_distance: first rule: hashes within this many bits.
        min_correlation: second rule: thumbnails correlating at least this much ...
        max_hash_distance_correlated: ... and hashes within this many bits.
        block: rows per block of the all-pairs comparison.
        method: ``"index"`` (multi-index hashing + inverted file, faiss), ``"all_pairs"``
            (every pair, O(N²) time; the reference) or ``"auto"``: all pairs up to
            `ALL_PAIRS_UP_TO` images (faster there: ~1 s), the index above. Both return the same pairs
            on every collection measured (see the module docstring: the inverted file is approximate).

    Returns:
        A DataFrame with columns ``i, j, hash_distance, correlation`` (row positions into
        the fingerprints), sorted by ``i, j``.

    Example:
        >>> prints = Fingerprints(np.zeros((2, 4), np.uint64), np.zeros((2, 1024), np.float32), np.ones(2, bool))
        >>> near_duplicate_pairs(prints)[["i", "j", "hash_distance"]].values.tolist()
        [[0, 1, 0]]
    """
    rule = (max_hash_distance, min_correlation, max_hash_distance_correlated)
    if method == "auto":
        method = "all_pairs" if len(prints) <= ALL_PAIRS_UP_TO else "index"
    if method == "index":
        return _indexed_pairs(prints, *rule)
    if method == "all_pairs":
        return _all_pairs(prints, *rule, block=block)
    raise ValueError(f"method must be 'auto', 'index' or 'all_pairs', not {method!r}")


def _all_pairs(
    prints: Fingerprints, max_hash_distance: int, min_correlation: float, max_hash_distance_correlated: int, block: int = 256
) -> pd.DataFrame:
    """The reference search: every pair, compared in blocks of ``block`` rows (O(N²) time)."""
    count = len(prints)
    found: list[pd.DataFrame] = []
    valid = prints.valid
    thumbnails = unit_thumbnails(prints.thumbnails)
    for start in range(0, count, block):
        stop = min(start + block, count)
        # Hamming distance over the four 64-bit words of each 256-bit hash.
        xor = prints.hashes[start:stop, None, :] ^ prints.hashes[None, :, :]
        distance = np.bitwise_count(xor).sum(axis=2, dtype=np.int32)
        correlation = thumbnails[start:stop] @ thumbnails.T
        rows = np.arange(start, stop)[:, None]
        columns = np.arange(count)[None, :]
        similar = (distance <= max_hash_distance) | ((correlation >= min_correlation) & (distance <= max_hash_distance_correlated))
        hit = similar & (columns > rows)
        hit &= valid[start:stop, None] & valid[None, :]
        i, j = np.nonzero(hit)
        found.append(_pair_frame(i + start, j, distance[i, j], correlation[i, j]))
    if not found:
        return _pair_frame(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    return pd.concat(found, ignore_index=True).sort_values(["i", "j"], ignore_index=True)


def _pair_frame(i: np.ndarray, j: np.ndarray, distance: np.ndarray, correlation: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i": i.astype(np.int64),
            "j": j.astype(np.int64),
            "hash_distance": distance.astype(np.int32),
            "correlation": correlation.astype(np.float64),
        }
    )


# Thumbnail dimensions kept by the projection the inverted file indexes. Measured on 30k synthetic
# fingerprints: 24k candidate pairs within the radius at 16 dimensions, 306 at 32 (280 true pairs),
# 300 at 64 (each dimension makes the index slower to build and search).
PROJECTION_DIMS = 32
# Rows the projection is fitted on (any orthonormal basis keeps the filter a necessary condition; a good one is tighter).
PROJECTION_SAMPLE = 5_000
# Inverted file (faiss.IndexIVFFlat): images per list on average, and lists searched per image. Each image is
# compared with ~PROBED_LISTS × IMAGES_PER_LIST others whatever the collection's size. Measured on synthetic
# fingerprints (2 loaded cores): 16 probed lists found every candidate an HNSW graph found at 10k and 100k and
# missed 1 of 306 at 30k; 32 found all (and all 293 / 997 pairs of the exact search at 30k / 100k).
IMAGES_PER_LIST = 64
PROBED_LISTS = 32
# Neighbours asked per image (itself included); images whose last one is still within the radius ask again for 4× more.
NEIGHBOURS = 8


def interleave_bits(hashes: np.ndarray, n_chunks: int) -> np.ndarray:
    """Reorder the bits of 256-bit hashes so bits ``c, c + n, c + 2n...`` sit side by side, as bytes.

    Multi-index hashing cuts a code into contiguous substrings; after this reordering each
    substring mixes low- and high-frequency DCT bits, which keeps the tables' buckets small
    on real radiographs (their low-frequency bits agree often). Hamming distances are unchanged.

    Args:
        hashes: ``(N, 4)`` uint64.
        n_chunks: the stride ``n``.

    Returns:
        ``(N, 32)`` uint8 codes.

    Example:
        >>> codes = interleave_bits(np.array([[1 << 63, 0, 0, 0]], np.uint64), 5)
        >>> int(codes[0, 0])  # bit 0 (the first) stays first
        128
    """
    bits = np.unpackbits(np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8), axis=1)
    order = np.concatenate([np.arange(chunk, HASH_SIZE * HASH_SIZE, n_chunks) for chunk in range(n_chunks)])
    return np.packbits(bits[:, order], axis=1)


def unit_thumbnails(thumbnails: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """The zero-mean, unit-norm float32 thumbnails of some rows, from 8-bit or already normalised ones.

    Args:
        thumbnails: ``(N, 1024)`` uint8 (normalised here, see `normalise_thumbnails`) or float32
            (returned as they are); a memory map is read only at ``rows``.
        rows: the rows wanted.

    Returns:
        ``(len(rows), 1024)`` float32.
    """
    selected = thumbnails[rows]
    if selected.dtype == np.uint8:
        return normalise_thumbnails(selected)
    return np.asarray(selected, dtype=np.float32)


def _hamming(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.bitwise_count(hashes[i] ^ hashes[j]).sum(axis=1, dtype=np.int32)


def _correlation(thumbnails: np.ndarray, i: np.ndarray, j: np.ndarray, batch: int = 8192) -> np.ndarray:
    out = np.empty(len(i), np.float32)
    for start in range(0, len(i), batch):  # in batches: 2 × 8192 float rows are 64 MB
        stop = start + batch
        left, right = unit_thumbnails(thumbnails, i[start:stop]), unit_thumbnails(thumbnails, j[start:stop])
        out[start:stop] = np.einsum("ij,ij->i", left, right)
    return out


def _hash_candidates(hashes: np.ndarray, rows: np.ndarray, max_hash_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` (row positions, ``i < j``) whose hashes are within ``max_hash_distance`` bits: exact.

    Multi-index hashing (`faiss.IndexBinaryMultiHash`) with ``m = D // 2 + 1`` substrings
    (at least 5) probed at radius 1: two hashes within ``D`` bits differ in at most one bit of
    some substring (pigeonhole: ``m`` substrings with 2 or more differing bits each would make
    ``2m > D``), so no pair is missed; faiss checks the full distance of every candidate.
    """
    n_chunks = min(HASH_SIZE * HASH_SIZE, max(5, max(0, max_hash_distance) // 2 + 1))
    index = faiss_module().IndexBinaryMultiHash(HASH_SIZE * HASH_SIZE, n_chunks, HASH_SIZE * HASH_SIZE // n_chunks)
    index.nflip = 1
    codes = interleave_bits(hashes[rows], n_chunks)
    index.add(codes)
    limits, _, found = index.range_search(codes, max_hash_distance + 1)  # faiss keeps distances < radius
    query = np.repeat(np.arange(len(rows)), np.diff(limits).astype(np.int64))
    keep = query < found
    return rows[query[keep]], rows[found[keep]]


def _projection(thumbnails: np.ndarray, rows: np.ndarray, block: int = 16_384) -> np.ndarray:
    """``(len(rows), PROJECTION_DIMS)`` float32: the unit thumbnails on the leading principal axes of a sample.

    The axes are eigenvectors of a symmetric matrix (`numpy.linalg.eigh`): orthonormal, so
    the projection never lengthens a distance.
    """
    rng = np.random.default_rng(0)
    sample = rows if len(rows) <= PROJECTION_SAMPLE else np.sort(rng.choice(rows, PROJECTION_SAMPLE, replace=False))
    fitted = unit_thumbnails(thumbnails, sample).astype(np.float64)
    fitted -= fitted.mean(axis=0)
    _, axes = np.linalg.eigh(fitted.T @ fitted)  # largest variance last
    basis = np.ascontiguousarray(axes[:, ::-1][:, :PROJECTION_DIMS]).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([unit_thumbnails(thumbnails, rows[s : s + block]) @ basis for s in range(0, len(rows), block)]))


def _thumbnail_candidates(thumbnails: np.ndarray, rows: np.ndarray, min_correlation: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` (row positions, ``i < j``) whose projected thumbnails lie within the correlation rule's radius.

    Unit vectors with correlation ``c`` are ``√(2 − 2c)`` apart, and the orthonormal
    projection (`_projection`) never lengthens that, so every pair satisfying the rule lies
    within that radius in the projection. The neighbours within it come from an inverted
    file (Jégou, Douze & Schmid, "Product quantization for nearest neighbor search", IEEE
    TPAMI 2011, §IV-A; `faiss.IndexIVFFlat`, Douze et al., "The Faiss library", 2024): k-means
    cells of ``IMAGES_PER_LIST`` images on average, each image compared with the images of its
    ``PROBED_LISTS`` nearest cells; ``NEIGHBOURS`` per image, and 4× more again for every image
    whose furthest one is still inside the radius, until none is — so a large group of copies
    is never cut short. The search is approximate: a copy in a cell not probed is missed.
    Measured: none missed at 10k, 30k and 100k synthetic fingerprints nor on
    ../shared/data/cxr (`benchmarks/bench_data_scale.py`, ``tests/data/test_dedup_index.py``).
    The small slack on the radius covers float32 rounding.
    """
    empty = np.zeros(0, np.int64)
    if len(rows) < 2:
        return empty, empty
    faiss = faiss_module()
    projected = _projection(thumbnails, rows)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(projected.shape[1]), projected.shape[1], max(1, len(rows) // IMAGES_PER_LIST))
    index.cp.max_points_per_centroid, index.cp.niter, index.cp.seed = 16, 10, 0  # coarse cells suffice: train on a sample
    index.train(projected)
    index.add(projected)
    index.nprobe = min(PROBED_LISTS, index.nlist)
    squared_radius = (float(np.sqrt(max(0.0, 2.0 - 2.0 * min_correlation))) + 1e-3) ** 2
    pending, wanted = np.arange(len(rows)), NEIGHBOURS
    found_i, found_j = [], []
    while len(pending):
        wanted = min(wanted, len(rows))
        distance, neighbour = index.search(projected[pending], wanted)
        inside = (distance <= squared_radius) & (neighbour >= 0)
        query = np.repeat(pending, wanted).reshape(inside.shape)
        found_i.append(np.minimum(query, neighbour)[inside])
        found_j.append(np.maximum(query, neighbour)[inside])
        pending = pending[inside[:, -1]] if wanted < len(rows) else empty
        wanted *= 4
    keys = np.unique(np.concatenate(found_i) * len(rows) + np.concatenate(found_j))
    i, j = keys // len(rows), keys % len(rows)
    return rows[i[i < j]], rows[j[i < j]]


def faiss_module():
    """`faiss` (faiss-cpu), imported on first use: only the indexed search needs it."""
    import faiss

    return faiss


def _indexed_pairs(
    prints: Fingerprints, max_hash_distance: int, min_correlation: float, max_hash_distance_correlated: int
) -> pd.DataFrame:
    """The index search: the pairs of `_all_pairs` without comparing every pair.

    Rule 1 (hash distance ≤ D): exact multi-index hashing (`_hash_candidates`). Rule 2
    (correlation ≥ c and hash distance ≤ D'): the inverted file of `_thumbnail_candidates`.
    Every candidate is kept only when the full rule holds. Correlations are float32 dot
    products pair by pair, where `_all_pairs` takes them from a block product: they can
    differ in the last bit, which matters only for a pair exactly at the threshold.
    """
    hashes, thumbnails = prints.hashes, prints.thumbnails
    usable = np.nonzero(prints.valid)[0]
    if min_correlation < 0.5:
        # The correlation rule then reaches most of the space: no index can prune it.
        return _all_pairs(prints, max_hash_distance, min_correlation, max_hash_distance_correlated)
    count = np.int64(len(prints))
    i, j = _hash_candidates(hashes, usable, max_hash_distance)
    found = [i * count + j]
    # thumbnails of flat images are all-zero: they correlate with nothing
    shaped = usable[_shaped(thumbnails, usable)]
    i, j = _thumbnail_candidates(thumbnails, shaped, min_correlation)
    keep = (_hamming(hashes, i, j) <= max_hash_distance_correlated) & (_correlation(thumbnails, i, j) >= min_correlation)
    found.append(i[keep] * count + j[keep])
    keys = np.unique(np.concatenate(found))
    i, j = keys // count, keys % count
    return _pair_frame(i, j, _hamming(hashes, i, j), _correlation(thumbnails, i, j))


def _shaped(thumbnails: np.ndarray, rows: np.ndarray, block: int = 16_384) -> np.ndarray:
    """Which of ``rows`` have a thumbnail with some contrast (a flat one normalises to all-zero)."""
    return np.concatenate(
        [unit_thumbnails(thumbnails, rows[s : s + block]).any(axis=1) for s in range(0, len(rows), block)] or [np.zeros(0, bool)]
    )


def link_groups(count: int, pairs: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Connected components of a graph on ``count`` nodes given its edges.

    Returns:
        ``(count,)`` int array: the component id of each node (0..k-1).
    """
    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    return labels


def edges_of_shared_values(values: pd.Series) -> np.ndarray:
    """Edges linking each row to the first row with the same non-missing value."""
    frame = pd.DataFrame({"value": values.to_numpy(), "row": np.arange(len(values))})
    frame = frame[~frame["value"].map(is_missing)]
    first = frame.groupby("value")["row"].transform("first")
    linked = frame["row"].to_numpy() != first.to_numpy()
    return np.column_stack([first.to_numpy()[linked], frame["row"].to_numpy()[linked]])


def assign_dup_groups(manifest: pd.DataFrame, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Return a copy of ``manifest`` whose ``dup_group`` links every near-duplicate.

    Groups join: rows already sharing a ``dup_group``, rows with the same ``sha1`` (exact
    copies), and the detected ``pairs`` (row positions, from `near_duplicate_pairs`).
    Singletons get an empty ``dup_group``; groups are named ``dup0001``, ``dup0002``...
    in order of their first row.
    """
    out = manifest.reset_index(drop=True).copy()
    edges = [edges_of_shared_values(out["dup_group"]), edges_of_shared_values(out["sha1"])]
    if pairs is not None and len(pairs):
        edges.append(pairs[["i", "j"]].to_numpy(dtype=np.int64))
    labels = link_groups(len(out), np.concatenate(edges) if edges else np.zeros((0, 2)))
    sizes = np.bincount(labels)
    names: dict[int, str] = {}
    groups: list[str | None] = []
    for label in labels:
        if sizes[label] < 2:
            groups.append(None)
            continue
        if label not in names:
            names[label] = f"dup{len(names) + 1:04d}"
        groups.append(names[label])
    out["dup_group"] = pd.Series(groups, dtype="object")
    return out


def find_near_duplicates(
    manifest: pd.DataFrame,
    workers: int | None = None,
    show_progress: bool = True,
    cache: FingerprintCache | str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[Rejection]]:
    """Fingerprint every image of a manifest and link its near-duplicates.

    Args:
        manifest: the manifest.
        workers: processes for decoding; None uses every available core.
        show_progress: draw a progress bar.
        cache: a `FingerprintCache` or its file (see `default_fingerprint_cache`); None
            fingerprints every image afresh.

    Returns:
        ``(manifest with dup_group filled, pairs, rejected)`` — ``pairs`` has the columns of
        `near_duplicate_pairs` plus ``image_i``/``image_j``; ``rejected`` lists unreadable
        images with the reason.
    """
    manifest = manifest.reset_index(drop=True)
    prints, rejected = fingerprint_images(manifest["image"].tolist(), workers=workers, show_progress=show_progress, cache=cache)
    pairs = near_duplicate_pairs(prints)
    pairs["image_i"] = manifest["image"].to_numpy()[pairs["i"].to_numpy(dtype=int)]
    pairs["image_j"] = manifest["image"].to_numpy()[pairs["j"].to_numpy(dtype=int)]
    return assign_dup_groups(manifest, pairs), pairs, rejected
