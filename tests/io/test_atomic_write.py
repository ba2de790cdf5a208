from __future__ import annotations

import os
import stat

import pytest

from covidcxr.io.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind


def test_atomic_write_uses_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_the_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import covidcxr.io.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "out.txt", "payload")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert ".tmp" in events[0][1] and events[1][1] == str(tmp_path / "out.txt") and events[2][1] == str(tmp_path)


def test_clean_stale_temps_removes_only_old_leftovers_of_atomic_path(tmp_path):
    import time

    from covidcxr.io.atomic import clean_stale_temps

    leftover = tmp_path / ".last.k2j4_x9a.tmp.ckpt"
    leftover.write_bytes(b"half")
    recent = tmp_path / ".best.q8w7e6r5.tmp.ckpt"
    recent.write_bytes(b"being written")
    other = tmp_path / ".hidden-user-file"
    other.write_text("keep")
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert clean_stale_temps(tmp_path, min_age_s=3600) == [leftover]
    assert recent.exists() and other.exists()
    assert clean_stale_temps(tmp_path) == [recent]  # min_age_s=0: the caller holds the folder
    assert clean_stale_temps(tmp_path / "absent") == []
