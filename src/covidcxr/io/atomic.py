"""Atomic, durable file writes: a crash or a power loss never leaves a half-written file under the final name.

`atomic_path` writes to a temporary file beside the target, then — before the rename —
flushes it to the disk (``fsync``), renames it onto the target (``os.replace``, atomic on
POSIX) and fsyncs the folder so the rename itself survives a power loss. Without the
first fsync, ext4/XFS may commit the rename before the data: after a power cut the target
exists with 0 bytes (the "zero-length file" problem; see the ext4 ``auto_da_alloc``
notes and Pillai et al., "All File Systems Are Not Created Equal", OSDI 2014).

Temporary files are named ``.<stem>.<random>.tmp<suffix>``; a process killed between
creating one and renaming it (``kill -9``, power loss) leaves it behind, and
`clean_stale_temps` removes such leftovers.

Example:
    >>> with atomic_path("out/manifest.csv") as tmp:  # doctest: +SKIP
    ...     frame.to_csv(tmp, index=False)
    >>> clean_stale_temps("out", min_age_s=3600)      # doctest: +SKIP
    []
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "clean_stale_temps", "fsync_path"]

#: The names `atomic_path` gives its temporary files: ``.<stem>.<mkstemp random>.tmp<suffix>``.
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp(\.[^/]*)?$")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_path(path: str | Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's) data and metadata to the disk.

    A folder is fsynced through a read-only descriptor (POSIX); file systems that refuse
    it (some network mounts) are skipped silently: the data itself was already synced.
    """
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync it and move it onto ``path`` only if the block succeeds.

    Example:
        >>> with atomic_path("out/manifest.csv") as tmp:  # doctest: +SKIP
        ...     frame.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last so libraries that pick a format from it still do.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes owner-only files; give the result the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        # The block wrote through its own handle (torch.save, to_parquet...) and closed it:
        # its bytes may still sit in the page cache. Sync them before the rename publishes them.
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def clean_stale_temps(folder: str | Path, min_age_s: float = 0.0, recursive: bool = False) -> list[Path]:
    """Remove the temporary files `atomic_path` left in ``folder`` when its process was killed.

    Args:
        folder: where to look (a missing folder is fine: nothing to clean).
        min_age_s: only files not modified for this long. 0 is right only when the caller
            holds the folder exclusively (e.g. under `covidcxr.io.lock.RunLock`); a folder
            other processes write into concurrently (the preprocessing cache) needs an age
            well above the time one write takes.
        recursive: also look in sub-folders.

    Returns:
        The files removed.

    Example:
        >>> clean_stale_temps("runs/demo/checkpoints")  # doctest: +SKIP
        [PosixPath('runs/demo/checkpoints/.last.k2j4_x9a.tmp.ckpt')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for candidate in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        if not TEMP_NAME.match(candidate.name):
            continue
        try:
            if not candidate.is_file() or now - candidate.stat().st_mtime < min_age_s:
                continue
            candidate.unlink()
        except FileNotFoundError:  # its writer finished (renamed it) meanwhile
            continue
        removed.append(candidate)
    return removed
