"""Reading PyTorch checkpoints safely: tensors and plain data only, never code.

``torch.load`` with ``weights_only=False`` unpickles arbitrary Python objects, so a
checkpoint someone tampered with in a shared run folder runs their code in the process
that loads it. Every checkpoint covidcxr reads goes through `read_checkpoint`
(``weights_only=True``: PyTorch's restricted unpickler, which allows tensors, containers
and primitive types only — see the ``torch.load`` documentation, "weights_only"), and a
refusal becomes one `CheckpointError` naming the file and why, never a library traceback.

Example:
    >>> checkpoint = read_checkpoint("runs/demo/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> sorted(checkpoint)[:3]                                            # doctest: +SKIP
    ['callbacks', 'covidcxr', 'epoch']
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from covidcxr.errors import CovidCXRError

__all__ = ["CheckpointError", "read_checkpoint"]


class CheckpointError(CovidCXRError):
    """A checkpoint file is missing, empty, truncated, or holds more than tensors and plain data.

    Attributes:
        path: the file. reason: what was wrong, in words.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with every failure named.

    Args:
        path: a ``.ckpt``/``.pt`` file.
        mmap: map the tensors instead of reading them (cheap look at the metadata).

    Returns:
        The checkpoint's top-level dict.

    Raises:
        CheckpointError: missing, empty or truncated file; pickled objects other than
            tensors and plain data (refused, never run); not a dict.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes: a write interrupted by a crash or power loss?); delete it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            path,
            "refused: it holds pickled Python objects beyond tensors and plain data, which could run code when "
            f"loaded (was it tampered with, or written by another program?) — {first}",
        ) from None
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, zipfile errors) for a damaged file
        raise CheckpointError(path, f"unreadable ({type(exc).__name__}: {exc}); truncated or not a PyTorch checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint
