"""``covidcxr export RUN --onnx``: the classifier and the lung U-Net as ONNX, checked against PyTorch.

What is exported (``torch.onnx.export`` with the dynamo exporter, opset 18, one
self-contained file each, a dynamic batch dimension):

* ``RUN/export/classifier.onnx``: `covidcxr.serve.engines.ClassifierOutputs` of the run's
  model (`covidcxr.train.inference.load_run`: a snapshot-ensemble run exports the whole
  ensemble, `covidcxr.models.ensemble.SnapshotEnsemble`, as one graph; a temperature-
  calibrated run has its temperature in the graph) — input
  ``image`` ``(N, 1, H, W)`` float32 in [0, 1] (the preprocessing's output), outputs
  ``probability`` (``(N,)`` binary, ``(N, K)`` otherwise) and ``stage_embeddings``
  ``(N, D_1 + ... + D_S)`` (pooled output of every backbone stage);
  the run's normalisation and sigmoid/softmax are inside the graph.
* ``RUN/export/lung_unet.onnx``: the run's lung U-Net (the shipped weights unless the
  recipe names others) followed by its sigmoid — input ``image`` ``(N, 1, S, S)`` (the
  prepared square, `covidcxr.preprocess.lungs.prepare_image`), output ``probability``
  ``(N, C, S, S)``, one channel per annotation convention.
* ``RUN/export/export.json``: the files, shapes, versions, the SHA-1 of the checkpoint(s) and
  of the segmenter weights they came from (a retrained run makes the export stale, and the
  ONNX engine refuses it), and the **measured agreement** with PyTorch float32 on sample
  inputs (training images of the run where its inference reference exists, plus seeded
  random textures): the largest absolute difference of the probabilities and embeddings,
  and of the U-Net's probability maps, against the stated tolerance `TOLERANCE`. The
  export fails if any exceeds it. The Dice between the ONNX masks and those of the
  PyTorch engine's bf16 fast path is reported too (that path, not ONNX, is the one that
  differs most from float32).

Example:
    >>> summary = export_onnx("runs/demo")                                     # doctest: +SKIP
    >>> summary["classifier"]["max_abs_diff_probability"] <= summary["tolerance"]   # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidcxr.data.manifest import file_sha1
from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.rundir import RunDir
from covidcxr.serve.errors import EngineUnavailable

__all__ = ["EXPORT_DIR", "TOLERANCE", "SegmenterProbabilities", "export_onnx", "measure_agreement", "read_export", "segmenter_sha1"]

EXPORT_DIR = RunDir.EXPORT
EXPORT_FILE = "export.json"
CLASSIFIER_FILE = "classifier.onnx"
SEGMENTER_FILE = "lung_unet.onnx"
# Largest allowed |ONNX - PyTorch float32| on probabilities (classifier and U-Net). float32
# kernels differ in summation order only; 1e-4 is far below any decision's resolution
# (probabilities are shown to 3 decimals) and far above the ~1e-7 actually measured.
TOLERANCE = 1e-4
OPSET = 18
RANDOM_SAMPLES = 6


class SegmenterProbabilities(torch.nn.Module):
    """The U-Net followed by its sigmoid: prepared ``(N, 1, S, S)`` -> probabilities ``(N, C, S, S)``."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(image))


def segmenter_sha1(weights: str | None) -> str:
    """SHA-1 over the segmenter weights and their metadata file (None: the shipped ones)."""
    from covidcxr.preprocess.lungs import resolve_weights

    return "+".join(file_sha1(path) for path in resolve_weights(weights))


def _textures(shape: tuple[int, int], count: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth random images ``(count, H, W)`` in [0, 1] (coarse blocks + fine noise)."""
    rng = np.random.default_rng(seed)
    height, width = shape
    out = np.empty((count, height, width), dtype=np.float32)
    for i in range(count):
        coarse = rng.random((8, 8))
        rows = np.minimum(np.arange(height) * 8 // height, 7)
        cols = np.minimum(np.arange(width) * 8 // width, 7)
        out[i] = 0.7 * coarse[rows][:, cols] + 0.3 * rng.random((height, width))
    return out


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    """Export ``module`` to ``path`` atomically, with a dynamic batch, quietly."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." is noise here
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=outputs,
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except CovidCXRError:
        raise
    except Exception as exc:  # the exporter's many error types
        raise CovidCXRError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {str(exc)[:500]}") from None
    finally:
        exporter_log.setLevel(level)


def _sample_inputs(run: Any) -> tuple[np.ndarray, str]:
    """Training model inputs stored with the run's inference reference (if built), plus random textures."""
    from covidcxr.serve.reference import REFERENCE_FILE, EmbeddingReference

    samples = [_textures(run.input_size, RANDOM_SAMPLES)]
    described = f"{RANDOM_SAMPLES} seeded random textures"
    path = run.run_dir / REFERENCE_FILE
    if path.is_file():
        try:
            stored = EmbeddingReference.load(path).sample_inputs
        except (OSError, ValueError, KeyError):
            stored = np.zeros((0, *run.input_size), np.uint8)
        if len(stored) and tuple(stored.shape[1:]) == tuple(run.input_size):
            samples.insert(0, stored.astype(np.float32) / 255.0)
            described = f"{len(stored)} training images of the run + " + described
    return np.concatenate(samples), described


def measure_agreement(run: Any, folder: Path, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Run the exported networks in ``folder`` and PyTorch float32 on the same samples; compare.

    Args:
        run: the loaded run (`covidcxr.train.inference.LoadedRun`) the export came from.
        folder: holds ``classifier.onnx`` and ``lung_unet.onnx``.
        tolerance: the largest allowed absolute difference of probabilities.

    Returns:
        ``{"samples", "n_samples", "classifier": {...}, "lung_unet": {...}}`` with the
        measured differences (the ``export.json`` sections).

    Raises:
        CovidCXRError: a difference over ``tolerance`` (or not finite).
    """
    from covidcxr.preprocess.lungs import LungSegmenter, dice_score, load_model, prepare_image
    from covidcxr.serve.engines import ClassifierOutputs, OnnxClassifier, OnnxLungSegmenter, onnx_session

    height, width = run.input_size
    classifier = ClassifierOutputs(run).eval()
    samples, described = _sample_inputs(run)
    with torch.inference_mode():
        torch_p, torch_e = classifier(torch.from_numpy(samples[:, None]))
    onnx_p, onnx_e = OnnxClassifier(folder / CLASSIFIER_FILE)(samples)
    diff_p = float(np.abs(onnx_p - torch_p.numpy()).max())
    diff_e = float(np.abs(onnx_e - torch_e.numpy()).max())

    weights = run.preprocess_config.segmenter_weights
    unet, seg_config, _ = load_model(weights)
    segmenter_module = SegmenterProbabilities(unet).eval()
    size = seg_config.input_size
    square = [prepare_image(image, size, seg_config.equalization)[0] for image in _textures((size, size), 2, seed=1)]
    square += [prepare_image(image, size, seg_config.equalization)[0] for image in samples]
    prepared = np.stack(square)[:, None]
    with torch.inference_mode():
        torch_maps = segmenter_module(torch.from_numpy(prepared)).numpy()
    session = onnx_session(folder / SEGMENTER_FILE)
    (onnx_maps,) = session.run(None, {session.get_inputs()[0].name: prepared})
    diff_maps = float(np.abs(onnx_maps - torch_maps).max())
    images = list(samples)
    onnx_masks = OnnxLungSegmenter(folder / SEGMENTER_FILE, weights).segment_batch(images)
    dice = [dice_score(a, b) for a, b in zip(onnx_masks, LungSegmenter.load(weights, fast=True).segment_batch(images))]

    worst = max(diff_p, diff_maps)
    if worst > tolerance or not np.isfinite(worst):
        raise CovidCXRError(
            f"ONNX export of {run.run_dir} disagrees with PyTorch: max |diff| of probabilities {worst:.3g} "
            f"(classifier {diff_p:.3g}, lung U-Net {diff_maps:.3g}) > tolerance {tolerance:g}; not marked usable"
        )
    return {
        "samples": described,
        "n_samples": int(len(samples)),
        "classifier": {
            "file": CLASSIFIER_FILE,
            "input": {"name": "image", "shape": ["batch", 1, height, width], "range": [0.0, 1.0]},
            "outputs": {"probability": ["batch"] if run.binary else ["batch", len(run.classes)], "stage_embeddings": ["batch", int(torch_e.shape[1])]},
            "stage_sizes": classifier.stage_sizes(),
            "classes": list(run.classes),
            "max_abs_diff_probability": diff_p,
            "max_abs_diff_embedding": diff_e,
            "embedding_max_abs": float(np.abs(torch_e.numpy()).max()),
        },
        "lung_unet": {
            "file": SEGMENTER_FILE,
            "input": {"name": "image", "shape": ["batch", 1, size, size], "range": [0.0, 1.0]},
            "outputs": {"probability": ["batch", len(seg_config.conventions), size, size]},
            "conventions": list(seg_config.conventions),
            "max_abs_diff_probability": diff_maps,
            "mask_dice_vs_torch_bf16_fast_path_mean": round(float(np.mean(dice)), 6),
            "mask_dice_vs_torch_bf16_fast_path_min": round(float(np.min(dice)), 6),
        },
    }


def export_onnx(run_dir: str | Path, out_dir: str | Path | None = None, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export a run's classifier and lung U-Net to ONNX and measure their agreement with PyTorch.

    Args:
        run_dir: the run directory.
        out_dir: where to write (default ``RUN/export``).
        tolerance: the largest allowed absolute difference of probabilities.

    Returns:
        The summary written to ``export.json`` (written last, and only when the agreement
        is within ``tolerance``: without it the ONNX engine refuses the folder).

    Raises:
        CovidCXRError: the run cannot be loaded, the exporter fails, or ONNX and PyTorch
            differ by more than ``tolerance`` (`measure_agreement`).
    """
    import onnxruntime

    from covidcxr.preprocess.lungs import load_model
    from covidcxr.serve.engines import ClassifierOutputs
    from covidcxr.train.inference import load_run

    started = time.perf_counter()
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    stale = out / EXPORT_FILE
    if stale.exists():
        stale.unlink()  # the folder is not usable until the new files are verified
    height, width = run.input_size
    _export(ClassifierOutputs(run).eval(), torch.rand(2, 1, height, width), out / CLASSIFIER_FILE, ["probability", "stage_embeddings"])
    weights = run.preprocess_config.segmenter_weights
    unet, seg_config, _ = load_model(weights)
    size = seg_config.input_size
    _export(SegmenterProbabilities(unet).eval(), torch.rand(2, 1, size, size), out / SEGMENTER_FILE, ["probability"])

    agreement = measure_agreement(run, out, tolerance)
    summary: dict[str, Any] = {
        "run": run.name,
        "tolerance": tolerance,
        "tolerance_means": "max |ONNX - PyTorch float32| of probabilities on the samples",
        **agreement,
        "checkpoint": run.model_description,
        "checkpoint_sha1": run.weights_fingerprint,
        "threshold": run.threshold if run.binary else None,
        "temperature": run.temperature,
        "segmenter_weights": weights,
        "segmenter_sha1": segmenter_sha1(weights),
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gradcam": "not in the ONNX graph (it needs gradients): the ONNX engine computes Grad-CAM with PyTorch on the same checkpoint",
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / EXPORT_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def read_export(run_dir: str | Path, checkpoint: Path | str | None = None) -> tuple[Path, dict[str, Any]]:
    """The export folder of a run and its ``export.json``, checked to be current.

    Args:
        run_dir: the run directory.
        checkpoint: the model being served: its weights fingerprint
            (`covidcxr.train.inference.LoadedRun.weights_fingerprint`), or one checkpoint
            file (its SHA-1); it must match the export's.

    Raises:
        EngineUnavailable: no export, or one made from another checkpoint or other
            segmenter weights (the message says to re-export).
    """
    folder = RunDir(run_dir).export_dir
    path = folder / EXPORT_FILE
    if not path.is_file():
        raise EngineUnavailable(f"run {run_dir} has no ONNX export ({path} is missing); run `covidcxr export {run_dir} --onnx` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(f"{path} is unreadable ({exc}); run `covidcxr export {run_dir} --onnx` again") from None
    wanted = file_sha1(checkpoint) if isinstance(checkpoint, Path) else checkpoint
    if wanted is not None and summary.get("checkpoint_sha1") != wanted:
        raise EngineUnavailable(f"the ONNX export in {folder} was made from another checkpoint than the run's model now (its weights changed); run `covidcxr export {run_dir} --onnx` again")
    try:
        current = segmenter_sha1(summary.get("segmenter_weights"))
    except CovidCXRError:
        current = None
    if current != summary.get("segmenter_sha1"):
        raise EngineUnavailable(f"the lung U-Net weights changed since the ONNX export in {folder}; run `covidcxr export {run_dir} --onnx` again")
    return folder, summary
