"""Shared helpers of the serve tests: one tiny trained run per process, and crafted inputs.

`tiny_run` trains `generated_data.tiny_train_recipe` (160 64-px phantoms with a planted
corner marker, Conv8, 8 epochs: ~6 s) once per test process and hands every module the same run directory; modules
copy it when they write into it (export, reference).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidcxr.io.writers import write_dicom, write_png
from generated_data import tiny_train_recipe

_RUNS: dict[str, Path] = {}


def tiny_run(tmp_path_factory) -> Path:
    """A trained tiny run (trained once per process; treat it as read-only or `copy_run` it)."""
    if "tiny" not in _RUNS:
        from covidcxr.train import recipe_from_mapping, train_recipe

        root = tmp_path_factory.mktemp("serve-tiny-run")
        # A corner marker on every COVID phantom: a decisive model (test AUC ~0.98) in ~6 s.
        marker = {"kind": "marker", "site": None, "label": "covid", "strength": 1.0, "false_rate": 0.0}
        recipe = tiny_train_recipe(
            root,
            "serve-tiny",
            data={"synthetic": {"n_images": 160, "size": 64, "seed": 1, "shortcut": marker}, "task": "covid_vs_rest", "split": {"test_size": 0.3, "val_size": 0.25}},
            model={"name": "conv8", "arch_kwargs": {"width": 16}},
            train={"epochs": 8, "batch_size": 8, "checkpoint_every_n_steps": 0},
        )
        result = train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None)
        _RUNS["tiny"] = result.run_dir
    return _RUNS["tiny"]


def copy_run(run_dir: Path, target: Path) -> Path:
    """A private copy of a run directory (its images stay where the manifest says)."""
    shutil.copytree(run_dir, target)
    return target


def split_images(run_dir: Path, split: str) -> list[str]:
    """Image paths of one split of the run."""
    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    return manifest.loc[manifest["split"] == split, "image"].astype(str).tolist()


def png_bytes(image: np.ndarray) -> bytes:
    """A float ``(H, W)`` in [0, 1] (or uint8 ``(H, W, 3)``) as PNG bytes."""
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares ``width`` x ``height`` grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def colour_photo_bytes(size: int = 256, seed: int = 0) -> bytes:
    """A colourful 'photograph': smooth random colour fields (JPEG)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dicom_bytes(tmp_dir: Path, pixels: np.ndarray | None, **elements) -> bytes:
    """A DICOM file's bytes (`covidcxr.io.write_dicom`), e.g. with planted identifiers."""
    path = tmp_dir / "scan.dcm"
    write_dicom(path, pixels, "MONOCHROME2", **elements)
    data = path.read_bytes()
    path.unlink()
    return data


def phantom_as_uint16(path: str) -> np.ndarray:
    """A phantom PNG as 12-bit stored values (for DICOM fixtures)."""
    from covidcxr.io import read_image

    return np.round(read_image(path).pixels * 4095).astype(np.uint16)


def write_text_as_png(path: Path) -> Path:
    path.write_text("this is not an image, whatever its name says\n")
    return path


def write_phantom_png(path: Path, source: str) -> Path:
    """Copy a phantom image as a PNG under ``path``."""
    from covidcxr.io import read_image

    return write_png(path, read_image(source).pixels)


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on an ephemeral loopback port; yield its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
