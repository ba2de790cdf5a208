"""The two ways to run a trained run's networks: PyTorch, or onnxruntime on its ONNX export.

Both engines give the same two things per model input, from ONE forward pass: the class
probabilities and the pooled embedding of every backbone stage (the last one is
`covidcxr.models.base.CXRClassifier.embed`; the out-of-distribution check uses them all). `ClassifierOutputs` is that forward pass as a module:
the PyTorch engine runs it, and `covidcxr.serve.onnx_export` exports exactly it, so the
ONNX graph includes the run's input normalisation and output activation and the two
engines cannot drift apart.

The lung U-Net likewise: `OnnxLungSegmenter` is a `covidcxr.preprocess.lungs.LungSegmenter`
whose network pass runs on onnxruntime; the resize, equalisation, padding and
post-processing around it are the library's own, so `covidcxr.preprocess.pipeline`
calls it like the PyTorch segmenter.

Grad-CAM needs gradients, which onnxruntime does not give: with the ONNX engine the
saliency map is still computed by PyTorch on the same checkpoint (`covidcxr.audit.saliency`).

Example:
    >>> run = load_run("runs/demo")                                   # doctest: +SKIP
    >>> engine = TorchClassifier(run)                                 # doctest: +SKIP
    >>> probabilities, stage_embeddings = engine(images)  # (N,) or (N, K); (N, sum D_s)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.lungs import LungSegmenter, load_model
from covidcxr.serve.errors import EngineUnavailable

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["ClassifierOutputs", "TorchClassifier", "OnnxClassifier", "OnnxLungSegmenter", "onnx_session", "ENGINES"]

#: ``auto``: onnxruntime when the run has a current ONNX export (`covidcxr.serve.onnx_export.read_export`),
#: else PyTorch (`covidcxr.serve.predictor.Predictor` says which and why).
ENGINES = ("auto", "torch", "onnx")


class ClassifierOutputs(torch.nn.Module):
    """``(N, 1, H, W)`` model inputs in [0, 1] -> ``(probabilities, stage_embeddings)``.

    Probabilities are ``(N,)`` (binary run: the positive class) or ``(N, K)``.
    ``stage_embeddings`` ``(N, D_1 + ... + D_S)`` concatenates the globally average-pooled
    output of every backbone stage, first to last; the last block is what
    ``LoadedRun.embed`` gives. The early blocks describe the image's appearance
    (intensity, texture, acquisition), which the last stage is trained to ignore — the
    out-of-distribution check needs both (`covidcxr.serve.reference`). The normalisation
    and activation are the run's own (`LoadedRun.normalize`,
    `LoadedRun.probabilities_from_logits`), and the stages run in the order of
    `CXRClassifier.forward_features`, so this is the training-time forward pass.
    """

    def __init__(self, run: LoadedRun):
        super().__init__()
        self.run = run
        self.model = run.model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.run.normalize(images)
        pooled = []
        for stage in self.model.stages:
            x = stage(x)
            pooled.append(F.adaptive_avg_pool2d(x, 1).flatten(1))
        logits = self.model.forward_head(x)
        return self.run.probabilities_from_logits(logits), torch.cat(pooled, dim=1)

    @torch.no_grad()
    def stage_sizes(self) -> list[int]:
        """Width ``D_s`` of each stage's block in ``stage_embeddings`` (one dry run)."""
        height, width = self.run.input_size
        x = self.run.normalize(torch.zeros(1, 1, height, width))
        sizes = []
        for stage in self.model.stages:
            x = stage(x)
            sizes.append(int(x.shape[1]))
        return sizes


class TorchClassifier:
    """The run's classifier on PyTorch (CPU), one forward pass for probabilities and stage embeddings."""

    name = "torch"

    def __init__(self, run: LoadedRun, batch_size: int = 32):
        # channels-last: oneDNN's preferred layout for CPU convolutions (ResNet-18 at 224 px,
        # one thread: ~50 ms instead of ~60 ms per image, same float32 arithmetic;
        # ``benchmarks/bench_serve.py``). The run's model is shared (Grad-CAM, LoadedRun), which
        # is fine: the layout changes no result.
        self.module = ClassifierOutputs(run).eval().to(memory_format=torch.channels_last)
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W)`` float32 in [0, 1] -> ``(probabilities (N,) or (N, K), stage embeddings (N, sum D_s))`` as NumPy."""
        images = np.asarray(images, dtype=np.float32)
        probabilities, embeddings = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(images[start : start + self.batch_size, None]).contiguous(memory_format=torch.channels_last)
                p, e = self.module(batch)
                probabilities.append(p.float().numpy())
                embeddings.append(e.float().numpy())
        return np.concatenate(probabilities).astype(np.float64), np.concatenate(embeddings)


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads; None: the cores this process may use)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # an optional runtime: say how to get it
        raise EngineUnavailable(f"the ONNX engine needs onnxruntime ({exc}); install it with `pip install onnxruntime`") from None
    path = Path(path)
    if not path.is_file():
        raise EngineUnavailable(f"ONNX model {path} does not exist; run `covidcxr export RUN --onnx` first")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-session chatter in the service log
    # No busy-waiting between runs: onnxruntime's idle workers otherwise spin on the cores the
    # next steps need (equalisation, post-processing, the PyTorch networks). Measured
    # (ResNet-18 224-px run, 2 threads, quiet, interleaved): predict 94 -> 69 ms at 320 px,
    # 111 -> 81 ms at 1024^2; the network pass alone is barely slower without spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail...)
        raise EngineUnavailable(f"onnxruntime cannot load {path}: {exc}") from None


class OnnxClassifier:
    """The exported classifier (`covidcxr.serve.onnx_export`) on onnxruntime: same outputs as `TorchClassifier`."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(np.asarray(images, dtype=np.float32)[:, None])
        probabilities, embeddings = self.session.run(None, {self.input_name: images})
        return np.asarray(probabilities, dtype=np.float64), np.asarray(embeddings, dtype=np.float32)


class OnnxLungSegmenter(LungSegmenter):
    """`LungSegmenter` whose network pass runs the exported U-Net on onnxruntime.

    Everything around the network (resize, equalisation, padding, restoring, thresholding,
    keeping two components) is inherited, so masks match the PyTorch float32 path to the
    tolerance stated in the export's ``export.json``. The export has a fixed square input
    (the weights' ``input_size``), so only the identity test-time view is supported.

    Args:
        onnx_path: the exported U-Net (``RUN/export/lung_unet.onnx``).
        weights: the segmenter weights it was exported from (None: the shipped ones); their
            metadata gives the input size and threshold.
    """

    def __init__(self, onnx_path: str | Path, weights: str | None = None, threads: int | None = None, batch_size: int = 16):
        model, config, metadata = load_model(weights)
        if config.tta != "none":
            raise EngineUnavailable(f"the ONNX lung U-Net runs one view per image; these weights ask for test-time augmentation {config.tta!r}")
        super().__init__(model, config, fast=False, batch_size=batch_size, metadata=metadata, tta=False)
        self.session = onnx_session(onnx_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward_prepared(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities for prepared inputs ``(B, S, S)`` or ``(B, 1, S, S)`` -> ``(B, C, S, S)`` float32 (onnxruntime)."""
        array = np.asarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch, dtype=np.float32)
        if array.ndim == 3:
            array = array[:, None]
        size = self.config.input_size
        if array.shape[-2:] != (size, size):
            raise CovidCXRError(f"the ONNX lung U-Net takes {size}x{size} inputs, got {array.shape[-2:]} (test-time views need the PyTorch engine)")
        # The export ends in the sigmoid (`covidcxr.serve.onnx_export.SegmenterProbabilities`).
        (probabilities,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})
        return np.asarray(probabilities, dtype=np.float32)
