"""Fingerprints of the images a run trained and validated on, stored with the run.

``covidcxr evaluate RUN --data DIR`` excludes the images of DIR that are linked to what the run
saw (`covidcxr.evaluate.external.linked_reasons`): the same patient, file or file hash, and
*near-duplicates* — the same radiograph re-encoded, resized or re-windowed, found by
`covidcxr.data.dedup` from a 256-bit perceptual hash and a 32 x 32 thumbnail of each image.
Near-duplicates need the fingerprints of the seen images, and computing them means reading
those images — which a shipped model (its training collection lives elsewhere) or a run
copied to another machine cannot do: the check then found nothing, and leaked copies were
scored as unseen data.

So training ends by storing them (`write_seen_fingerprints`, ``RUN/inference/seen_fingerprints.npz``:
the image paths as the run's manifest writes them, the hashes and the 8-bit thumbnails —
about 1 KB per image), `covidcxr.zoo.package` ships them with a model, and `seen_fingerprints`
reads them before it reads any image. An image neither stored nor readable is counted and
warned about, never skipped silently.

Example:
    >>> write_seen_fingerprints("runs/demo")                        # doctest: +SKIP
    {'images': 312, 'unreadable': 0}
    >>> paths, prints, unreadable = seen_fingerprints(RunDir("runs/demo").seen())  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covidcxr.data.dedup import Fingerprints, default_fingerprint_cache, fingerprint_images
from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path
from covidcxr.rundir import RunDir, SeenData

__all__ = ["read_stored_fingerprints", "rewrite_stored_paths", "seen_fingerprints", "write_seen_fingerprints"]

_THUMBNAIL = 32 * 32


def _save(path: Path, paths: list[str], prints: Fingerprints) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                paths=np.asarray(paths, dtype=str),
                hashes=np.asarray(prints.hashes, dtype=np.uint64),
                thumbnails=np.asarray(prints.thumbnails, dtype=np.uint8),
            )


def read_stored_fingerprints(path: str | Path) -> tuple[list[str], Fingerprints]:
    """``(paths, fingerprints)`` of a ``seen_fingerprints.npz``, checked.

    Raises:
        CovidCXRError: unreadable, or arrays of the wrong kind or shape (naming the file and what was expected).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            paths, hashes, thumbnails = data["paths"], data["hashes"], data["thumbnails"]
    except (OSError, ValueError, KeyError) as exc:
        raise CovidCXRError(f"{path}: not a readable fingerprint file ({exc}); delete it and retrain, or evaluate where the training images can be read") from None
    n = len(paths)
    if (
        paths.ndim != 1 or paths.dtype.kind != "U"
        or hashes.shape != (n, 4) or hashes.dtype != np.uint64
        or thumbnails.shape != (n, _THUMBNAIL) or thumbnails.dtype != np.uint8
    ):
        raise CovidCXRError(
            f"{path}: expected paths (N,) text, hashes (N, 4) uint64 and thumbnails (N, {_THUMBNAIL}) uint8; got "
            f"{paths.shape} {paths.dtype}, {hashes.shape} {hashes.dtype}, {thumbnails.shape} {thumbnails.dtype}"
        )
    return paths.tolist(), Fingerprints(hashes, thumbnails, np.ones(n, dtype=bool))


def write_seen_fingerprints(run_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Fingerprint the run's train/val images that can be read and store them (`RunDir.seen_fingerprints`).

    Fingerprints come through the project's fingerprint cache (`covidcxr.data.dedup`), so a
    collection deduplicated before training is not decoded again.

    Returns:
        ``{"images": stored, "unreadable": not stored}``; nothing is written when no image can be read.
    """
    run = RunDir(run_dir)
    seen = run.seen()
    paths = seen.rows["image"].dropna().astype(str).unique().tolist()
    readable = [p for p in paths if Path(p).is_file()]
    if not readable:
        return {"images": 0, "unreadable": len(paths)}
    prints, _ = fingerprint_images(readable, show_progress=progress, cache=default_fingerprint_cache())
    keep = np.flatnonzero(np.asarray(prints.valid, dtype=bool))
    kept = Fingerprints(np.asarray(prints.hashes)[keep], np.asarray(prints.thumbnails)[keep], np.ones(len(keep), dtype=bool))
    _save(run.seen_fingerprints, [readable[i] for i in keep], kept)
    return {"images": int(len(keep)), "unreadable": int(len(paths) - len(keep))}


def rewrite_stored_paths(path: str | Path, old_prefix: str, new_prefix: str) -> None:
    """Replace ``old_prefix`` by ``new_prefix`` in a stored file's paths (`covidcxr.zoo.package`: no server path shipped)."""
    paths, prints = read_stored_fingerprints(path)
    prefix = old_prefix.rstrip("/") + "/"
    moved = [new_prefix.rstrip("/") + p[len(old_prefix.rstrip("/")) :] if p.startswith(prefix) else p for p in paths]
    _save(Path(path), moved, prints)


def seen_fingerprints(seen: SeenData, progress: bool = False) -> tuple[list[str], Fingerprints, list[str]]:
    """Fingerprints of the seen images: stored ones first, then those of readable files.

    Returns:
        ``(paths, fingerprints, unreadable)``: the seen image paths that have a fingerprint, row-
        aligned with it, and those that have none (neither stored nor readable and decodable).

    Raises:
        CovidCXRError: a stored fingerprint file is corrupt (`read_stored_fingerprints`).
    """
    paths = seen.rows["image"].dropna().astype(str).unique().tolist()
    stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for file in seen.fingerprint_files:
        keys, prints = read_stored_fingerprints(file)
        for i, key in enumerate(keys):
            stored.setdefault(key, (prints.hashes[i], prints.thumbnails[i]))
    missing = [p for p in paths if p not in stored]
    readable = [p for p in missing if Path(p).is_file()]
    computed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if readable:
        prints, _ = fingerprint_images(readable, show_progress=progress, cache=default_fingerprint_cache())
        for i, key in enumerate(readable):
            if bool(prints.valid[i]):
                computed[key] = (np.asarray(prints.hashes[i]), np.asarray(prints.thumbnails[i], dtype=np.uint8))
    found = [p for p in paths if p in stored or p in computed]
    unreadable = [p for p in paths if p not in stored and p not in computed]
    rows = [stored.get(p) or computed[p] for p in found]
    hashes = np.stack([r[0] for r in rows]).astype(np.uint64) if rows else np.zeros((0, 4), np.uint64)
    thumbnails = np.stack([r[1] for r in rows]).astype(np.uint8) if rows else np.zeros((0, _THUMBNAIL), np.uint8)
    return found, Fingerprints(hashes, thumbnails, np.ones(len(found), dtype=bool)), unreadable
