"""`covidcxr.io.lock.RunLock`: one writer per folder; the second is told who holds it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from covidcxr.io.lock import LOCK_FILE, FolderLocked, RunLock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from covidcxr.io.lock import RunLock
    with RunLock(sys.argv[1], command="covidcxr train recipes/holder.yaml"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _hold_in_subprocess(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_with_pid_host_command_and_since(tmp_path: Path) -> None:
    holder = _hold_in_subprocess(tmp_path / "run")
    try:
        with pytest.raises(FolderLocked) as refused:
            RunLock(tmp_path / "run", command="covidcxr train other.yaml").acquire()
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "covidcxr train recipes/holder.yaml" in message and "since 20" in message
        assert refused.value.holder["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # the kernel released the lock with the process: the leftover .lock file blocks nobody
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    with RunLock(tmp_path / "run", command="next") as lock:
        assert lock.holder()["pid"] == os.getpid() and lock.holder()["command"] == "next"


def test_the_lock_is_released_on_exit_and_on_an_exception(tmp_path: Path) -> None:
    with RunLock(tmp_path) as first:
        with pytest.raises(FolderLocked):  # a second open file description, even in the same process
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert first._descriptor is None
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            raise RuntimeError("crash while training")
    started = time.monotonic()
    with RunLock(tmp_path):
        pass
    assert time.monotonic() - started < 1.0  # never blocks
