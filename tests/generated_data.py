"""Tiny generated images and manifests for fast tests (importable from any test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidcxr.data.manifest import make_manifest
from covidcxr.io.writers import write_png


def random_texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth random image (distinct per seed) with structure a perceptual hash can see."""
    coarse = rng.random((8, 8))
    image = np.kron(coarse, np.ones((size // 8, size // 8)))
    return (0.7 * image + 0.3 * rng.random((size, size))).astype(np.float32)


def make_tiny_manifest(root: Path, sources: dict[str, dict[str, int]], images_per_patient: int = 1, seed: int = 0):
    """Write distinct tiny PNGs and return their manifest.

    Args:
        root: folder to write into.
        sources: source -> label -> number of patients.
        images_per_patient: images written per patient.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for source, labels in sources.items():
        for label, patients in labels.items():
            for patient in range(patients):
                for exposure in range(images_per_patient):
                    path = root / source / f"{label}_{patient}_{exposure}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_png(path, random_texture(rng))
                    rows.append(
                        {
                            "image": str(path),
                            "source": source,
                            "label": label,
                            "patient_id": f"{source}:{label}{patient}",
                            "sha1": None,
                        }
                    )
    return make_manifest(rows)
