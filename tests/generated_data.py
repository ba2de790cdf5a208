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


def tiny_train_recipe(root: Path, name: str = "tiny", **sections) -> dict:
    """A tiny training recipe mapping on 64-px phantoms (conv8, bf16, 1 thread): seconds per run.

    ``root`` holds the cache (phantoms are written under it once and shared by every run
    with the same ``data.synthetic``) and the runs; ``sections`` update the top-level
    sections (``train={"epochs": 2}`` merges into ``train``).
    """
    recipe = {
        "name": name,
        "seed": 0,
        "data": {
            "synthetic": {"n_images": 90, "size": 64, "seed": 1},
            "task": "covid_vs_rest",
            "split": {"test_size": 0.3, "val_size": 0.25},
        },
        "preprocess": {"cache_dir": str(root / "cache"), "size": 64, "mask_source": "manifest", "lungs": "none", "workers": 1},
        "model": {"name": "conv8", "arch_kwargs": {"width": 8}},
        "optimizer": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": 8, "checkpoint_every_n_steps": 0},
        "engine": {"threads": 1, "progress_bar": False},
        "output": {"runs_dir": str(root / "runs")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe
