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
300 phantoms is flagged. Pairs are computed in blocks over all images (O(n²)): fine up to
~20k images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from covidcxr.data.manifest import is_missing
from covidcxr.data.sources.base import Rejection
from covidcxr.parallel import map_items

HASH_SIZE = 16  # 16×16 DCT bits = 256-bit hash
THUMBNAIL_SIZE = 32
DEFAULT_MAX_HASH_DISTANCE = 24  # of 256 bits
DEFAULT_MIN_THUMBNAIL_CORRELATION = 0.97
DEFAULT_MAX_HASH_DISTANCE_CORRELATED = 48


@dataclass(frozen=True)
class Fingerprints:
    """Per-image fingerprints, row-aligned with a manifest.

    Attributes:
        hashes: ``(N, 4)`` uint64 — the 256-bit perceptual hash of each image.
        thumbnails: ``(N, 32*32)`` float32 — zero-mean, unit-norm thumbnails.
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
    grey = Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8))
    bits = imagehash.phash(grey, hash_size=HASH_SIZE).hash.reshape(-1)
    packed = np.packbits(bits).view(">u8").astype(np.uint64)
    thumbnail = np.asarray(grey.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX), dtype=np.float32).ravel()
    thumbnail = thumbnail - thumbnail.mean()
    norm = float(np.linalg.norm(thumbnail))
    # A flat image has no shape to compare: leave it all-zero so it correlates with nothing.
    thumbnail = thumbnail / norm if norm > 1e-6 else np.zeros_like(thumbnail)
    return packed, thumbnail


def _fingerprint_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    from covidcxr.io import read_image

    return fingerprint(read_image(path).pixels)


def fingerprint_images(
    paths: Sequence[str], workers: int | None = None, show_progress: bool = True
) -> tuple[Fingerprints, list[Rejection]]:
    """Read and fingerprint many images in parallel.

    Returns:
        The `Fingerprints` (row-aligned with ``paths``) and one `Rejection` per unreadable
        image, with the reason.
    """
    outcomes = map_items(_fingerprint_file, list(paths), workers=workers, description="fingerprinting", show_progress=show_progress)
    count = len(outcomes)
    hashes = np.zeros((count, HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)
    thumbnails = np.zeros((count, THUMBNAIL_SIZE * THUMBNAIL_SIZE), dtype=np.float32)
    valid = np.zeros(count, dtype=bool)
    rejected: list[Rejection] = []
    for index, outcome in enumerate(outcomes):
        if outcome.ok:
            hashes[index], thumbnails[index] = outcome.result
            valid[index] = True
        else:
            rejected.append(Rejection(str(outcome.item), outcome.error or "unreadable"))
    return Fingerprints(hashes, thumbnails, valid), rejected


def near_duplicate_pairs(
    prints: Fingerprints,
    max_hash_distance: int = DEFAULT_MAX_HASH_DISTANCE,
    min_correlation: float = DEFAULT_MIN_THUMBNAIL_CORRELATION,
    max_hash_distance_correlated: int = DEFAULT_MAX_HASH_DISTANCE_CORRELATED,
    block: int = 256,
) -> pd.DataFrame:
    """All pairs ``i < j`` of near-duplicate images.

    Returns:
        A DataFrame with columns ``i, j, hash_distance, correlation`` (row positions into
        the fingerprints), sorted by ``i, j``.

    Example:
        >>> prints = Fingerprints(np.zeros((2, 4), np.uint64), np.zeros((2, 1024), np.float32), np.ones(2, bool))
        >>> near_duplicate_pairs(prints)[["i", "j", "hash_distance"]].values.tolist()
        [[0, 1, 0]]
    """
    count = len(prints)
    found: list[pd.DataFrame] = []
    valid = prints.valid
    for start in range(0, count, block):
        stop = min(start + block, count)
        # Hamming distance over the four 64-bit words of each 256-bit hash.
        xor = prints.hashes[start:stop, None, :] ^ prints.hashes[None, :, :]
        distance = np.bitwise_count(xor).sum(axis=2, dtype=np.int32)
        correlation = prints.thumbnails[start:stop] @ prints.thumbnails.T
        rows = np.arange(start, stop)[:, None]
        columns = np.arange(count)[None, :]
        similar = (distance <= max_hash_distance) | ((correlation >= min_correlation) & (distance <= max_hash_distance_correlated))
        hit = similar & (columns > rows)
        hit &= valid[start:stop, None] & valid[None, :]
        i, j = np.nonzero(hit)
        found.append(
            pd.DataFrame(
                {
                    "i": i + start,
                    "j": j,
                    "hash_distance": distance[i, j],
                    "correlation": correlation[i, j].astype(np.float64),
                }
            )
        )
    if not found:
        return pd.DataFrame({"i": [], "j": [], "hash_distance": [], "correlation": []})
    return pd.concat(found, ignore_index=True).sort_values(["i", "j"], ignore_index=True)


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
    manifest: pd.DataFrame, workers: int | None = None, show_progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame, list[Rejection]]:
    """Fingerprint every image of a manifest and link its near-duplicates.

    Returns:
        ``(manifest with dup_group filled, pairs, rejected)`` — ``pairs`` has the columns of
        `near_duplicate_pairs` plus ``image_i``/``image_j``; ``rejected`` lists unreadable
        images with the reason.
    """
    manifest = manifest.reset_index(drop=True)
    prints, rejected = fingerprint_images(manifest["image"].tolist(), workers=workers, show_progress=show_progress)
    pairs = near_duplicate_pairs(prints)
    pairs["image_i"] = manifest["image"].to_numpy()[pairs["i"].to_numpy(dtype=int)]
    pairs["image_j"] = manifest["image"].to_numpy()[pairs["j"].to_numpy(dtype=int)]
    return assign_dup_groups(manifest, pairs), pairs, rejected
