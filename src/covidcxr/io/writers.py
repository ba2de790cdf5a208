"""Writing images: PNG only, atomically, 8 or 16 bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.io.atomic import atomic_path


def write_png(path: str | Path, image: np.ndarray, bits: int = 8) -> Path:
    """Write a 2-D image as a greyscale PNG, atomically.

    Args:
        path: destination file.
        image: ``(H, W)`` array; floats are taken as [0, 1] and clipped, integers and bools
            are written as they are (bool → 0/255).
        bits: 8 or 16 (ignored for integer input, whose dtype decides).

    Returns:
        ``path`` as a `Path`.

    Example:
        >>> write_png("/tmp/x.png", np.zeros((4, 4), np.float32))  # doctest: +SKIP
    """
    if image.ndim != 2:
        raise ValueError(f"write_png expects a 2-D (H, W) image, got shape {image.shape}")
    if image.dtype == bool:
        pixels = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits}")
        top = 255 if bits == 8 else 65535
        pixels = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    elif image.dtype in (np.uint8, np.uint16):
        pixels = image
    else:
        raise ValueError(f"write_png cannot write dtype {image.dtype}; use float in [0,1], bool, uint8 or uint16")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path
