"""Tiny generated images and manifests for fast tests (importable from any test module)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from covidcxr.data.manifest import make_manifest
from covidcxr.io.writers import write_dicom, write_png


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


def make_fake_run(run_dir: Path, seed: int = 0, name: str = "fake") -> pd.DataFrame:
    """Two seen sources (scores separate the classes) + one unseen (random) + one negatives-only seen source."""
    rng = np.random.default_rng(seed)
    rows = []
    layout = {"alpha": (60, 2.5), "beta": (50, 2.0), "gamma": (60, 0.0)}  # source: (images, separation)
    for source, (n, sep) in layout.items():
        for i in range(n):
            target = i % 2
            score = 1.0 / (1.0 + np.exp(-(rng.normal() + sep * (2 * target - 1))))
            rows.append({"source": source, "patient_id": f"{source}-p{i // 2}", "target": target, "probability": score})
    for i in range(20):  # negatives only
        rows.append({"source": "delta", "patient_id": f"delta-p{i}", "target": 0, "probability": float(rng.uniform(0, 0.7))})
    test = pd.DataFrame(rows)
    test["split"] = "test"
    val = test[test["source"] != "gamma"].head(30).copy()
    val["split"] = "val"
    val["patient_id"] = "val-" + val["patient_id"]
    predictions = pd.concat([val, test], ignore_index=True)
    predictions["label"] = np.where(predictions["target"] == 1, "covid", "other")
    predictions["run"] = name
    predictions["predicted"] = (predictions["probability"] >= 0.5).astype(int)
    run_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    manifest = pd.DataFrame({
        "image": [f"img{i}.png" for i in range(8)],
        "source": ["alpha", "alpha", "beta", "beta", "delta", "alpha", "gamma", "gamma"],
        "split": ["train", "train", "train", "val", "train", "test", "test", "test"],
        "patient_id": [f"m{i}" for i in range(8)],
    })
    manifest.to_parquet(run_dir / "manifest.parquet", index=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": name, "data": {"sources": ["alpha", "beta"], "negatives_from": ["delta"]}}))
    return predictions


# ------------------------------------------------------------------ a hospital PACS export (DICOM)

#: the raw DICOM Patient IDs of `build_pacs_export` (no output may ever contain them)
RAW_IDS = [f"MRN-4711-{name}" for name in ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT")]


def pacs_radiograph(seed: int, size: int = 96) -> np.ndarray:
    """A 12-bit smooth 'chest' with noise: passes the screening (many grey levels, grey, square)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-((cols - 0.3) ** 2 + (rows - 0.5) ** 2) * 12) + np.exp(-((cols - 0.7) ** 2 + (rows - 0.5) ** 2) * 12)
    image = 0.8 - 0.5 * lungs + 0.05 * rng.standard_normal((size, size)) + 0.1 * seed / 10
    return np.clip(image * 4095, 0, 4095).astype(np.uint16)


def build_pacs_export(root: Path, conflicting_copy: bool) -> Path:
    """covid/ and normal/ with 2 extension-less DICOMs per patient (3 patients each); one is JPEG Lossless.

    Copies: ``covid/<first file>`` copied twice more under ``covid/copies/`` and, when
    ``conflicting_copy``, once under ``normal/``.
    """
    files: list[Path] = []
    for index, raw_id in enumerate(RAW_IDS):
        label = "covid" if index < 3 else "normal"
        for image in range(2):
            path = root / label / f"1.2.840.{index}.{image}"  # PACS-style names, no extension
            write_dicom(path, pacs_radiograph(10 * index + image), "MONOCHROME2", 12, PatientID=raw_id, Modality="DX", ViewPosition="PA",
                        PatientName=f"Doe^{raw_id}")
            files.append(path)
    import pytest  # only this helper needs it: skips the calling test without python-gdcm

    gdcm = pytest.importorskip("gdcm")
    lossless = files[2]  # BRAVO's first image, re-encoded as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(lossless))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(lossless))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    (root / "covid" / "copies").mkdir()
    for name in ("c1", "c2"):
        shutil.copy(files[0], root / "covid" / "copies" / name)
    if conflicting_copy:
        shutil.copy(files[0], root / "normal" / "misfiled")
    return root


def files_mentioning(folder: Path, needles: list[str]) -> list[str]:
    """Like ``grep -rl`` over every file (and file name) under ``folder``, binary included."""
    hits = []
    for directory, _, names in os.walk(folder):
        for name in names:
            path = Path(directory) / name
            data = path.read_bytes()
            if any(n.encode() in data or n in str(path) for n in needles):
                hits.append(str(path))
    return hits
