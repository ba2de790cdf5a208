"""A folder locked against a second writer: ``RUN/.lock``, held with ``fcntl.flock``.

Two ``covidcxr train`` commands on the same run folder would interleave checkpoints,
logs and predictions. `RunLock` takes an exclusive, non-blocking ``flock`` on
``<folder>/.lock`` and writes who holds it (pid, host, command, since when) into the
file; a second writer is refused with a `FolderLocked` error quoting that line.

Why ``flock`` and not a pid file: the kernel releases the lock when its holder exits,
however it exits (``kill -9``, a crash, a power loss), so a stale ``.lock`` left on disk
never blocks the next run — only a live holder does. ``flock`` works on local file
systems and on NFSv4 (Linux emulates it with POSIX byte-range locks there).

Example:
    >>> with RunLock("runs/demo", command="covidcxr train recipes/demo.yaml"):  # doctest: +SKIP
    ...     train()
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from covidcxr.errors import CovidCXRError

__all__ = ["FolderLocked", "LOCK_FILE", "RunLock"]

LOCK_FILE = ".lock"


class FolderLocked(CovidCXRError):
    """Another live process holds the folder's lock.

    Attributes:
        folder: the locked folder.
        holder: what the holder wrote (``pid``, ``host``, ``command``, ``since``), if readable.
    """

    def __init__(self, folder: Path, holder: dict[str, Any]):
        self.folder = folder
        self.holder = holder
        if holder:
            who = (
                f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
                f"(command: {holder.get('command') or 'unknown'})"
            )
        else:
            who = "a process that has not yet said who it is"
        super().__init__(
            f"{folder} is in use by another writer: {who}. Wait for it to finish, or stop it; "
            f"two writers in one run folder would mix their checkpoints"
        )


class RunLock:
    """An exclusive writer lock on a folder, as a context manager.

    Args:
        folder: the folder to lock (created if missing).
        command: what this process is doing, shown to a second writer
            (default: the process's own command line).

    Raises:
        FolderLocked: on ``__enter__``, when another live process holds the lock.
    """

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command if command is not None else " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
        self._descriptor: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the current (or last) holder wrote into the lock file; ``{}`` if nothing readable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> RunLock:
        """Take the lock (non-blocking) and write this process's identity into it."""
        if self._descriptor is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # O_RDWR without O_TRUNC: the holder's identity stays readable until we own the lock.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise FolderLocked(self.folder, self.holder()) from None
        except BaseException:
            os.close(descriptor)
            raise
        identity = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(identity) + "\n").encode("utf-8"), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a waiting writer)."""
        if self._descriptor is None:
            return
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
