"""`covidcxr.io.checkpoint.read_checkpoint`: tensors only; a tampered checkpoint is refused, naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from covidcxr.io.checkpoint import CheckpointError, read_checkpoint


class _Payload:
    """Unpickling this would run ``os.system`` — what a tampered checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tampered_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "callbacks": _Payload(marker)}, path)
    return path


def test_a_tampered_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tampered_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(path)
    assert str(path) in str(refused.value) and "refused" in str(refused.value) and "tampered" in str(refused.value)
    assert not marker.exists()


def test_empty_truncated_and_missing_checkpoints_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, good)
    assert read_checkpoint(good)["epoch"] == 1
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: is empty \(0 bytes"):
        read_checkpoint(empty)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: unreadable"):
        read_checkpoint(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_no_checkpoint_load_in_the_package_allows_pickled_code() -> None:
    """Every ``torch.load`` call in the package, and every call passing ``weights_only``, says ``weights_only=True``."""
    import ast

    import covidcxr

    root = Path(covidcxr.__file__).parent
    offenders, loads = [], 0
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            is_torch_load = isinstance(node.func, ast.Attribute) and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if is_torch_load:
                loads += 1
            if (is_torch_load or flag is not None) and not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{source.relative_to(root)}:{node.lineno}")
    assert loads >= 3 and offenders == []
