"""A trained run, loaded for inference: the one way audit, predict, serve and experiments run a model.

Everything downstream of training (``covidcxr audit``, ``covidcxr predict``, the service,
the experiment grid's cross-source tests) needs the same four things: the network from the
run's checkpoint, the run's preprocessing settings (so inference sees exactly what training
saw), the input normalisation, and a batched forward pass. `load_run` gives them together.

The network is the run's model as `covidcxr.rundir.RunDir.weights` names it — the
snapshot ensemble (`covidcxr.models.ensemble.SnapshotEnsemble`) when the run's metrics
come from the ensemble's average, else ``best.ckpt`` — so what is deployed is what was
evaluated; the threshold and temperature are the run's operating point
(`covidcxr.rundir.RunDir.operating_point`).

New images (files, or arrays as read) go through the run's own preprocessing with
`LoadedRun.predict_files` / `LoadedRun.predict_array`; `LoadedRun.predict` takes model
inputs that are already preprocessed.

Example:
    >>> run = load_run("runs/demo")                                  # doctest: +SKIP
    >>> images = np.random.rand(4, 128, 128).astype(np.float32)      # model inputs in [0, 1]
    >>> run.predict(images).shape, run.embed(images).shape           # doctest: +SKIP
    ((4,), (4, 512))
    >>> run.predict_files(["cxr-1.png", "cxr-2.dcm"])[["image", "probability", "decision"]]  # doctest: +SKIP
           image  probability decision
    0  cxr-1.png        0.912    covid
    1  cxr-2.dcm        0.103    other
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier
from covidcxr.preprocess.pipeline import PreprocessConfig
from covidcxr.rundir import ModelWeights, OperatingPoint, RunDir
from covidcxr.train.recipe import TrainRecipe, recipe_from_mapping

__all__ = ["LoadedRun", "find_runs", "latest_run", "load_run", "cached_inputs"]

CHECKPOINT_NAMES = ("best", "last")


@dataclass(eq=False)
class LoadedRun:
    """A run's network and settings, ready for inference on the CPU (or ``device``).

    Attributes:
        run_dir: the run directory.
        checkpoint: the (first) checkpoint the weights came from.
        model: the network, in eval mode (a `SnapshotEnsemble` for an ensemble run).
        recipe: the resolved recipe the run was trained with.
        classes: class names in output order (binary: ``[negative, positive]``).
        threshold: the decision threshold on the positive class's probability: the run's
            operating point (``operating_point.json``; 0.5 for a run without one).
        info: the checkpoint's provenance (config hash, manifest hash, split ids...).
        weights: which checkpoint(s) the model is (`ModelWeights`).
        operating_point: the stored operating point (rule, validation numbers, temperature).
    """

    run_dir: Path
    checkpoint: Path
    model: CXRClassifier
    recipe: TrainRecipe
    classes: list[str]
    threshold: float
    info: dict[str, Any]
    weights: ModelWeights | None = None
    operating_point: OperatingPoint | None = None
    _segmenter: Any = field(default=None, init=False, repr=False)

    @property
    def temperature(self) -> float | None:
        """The temperature dividing the logits (None: uncalibrated)."""
        return None if self.operating_point is None else self.operating_point.temperature

    @property
    def weights_fingerprint(self) -> str:
        """SHA-1 of the model's checkpoint file(s) and temperature: exports and caches made from other weights are stale."""
        base = self.weights.fingerprint() if self.weights is not None else ModelWeights("checkpoint", (self.checkpoint,)).fingerprint()
        return base if self.temperature is None else f"{base}@T={self.temperature:.12g}"

    @property
    def model_description(self) -> str:
        """``best.ckpt`` or ``snapshot ensemble of 3 (snapshot-0.ckpt, ...)``."""
        return self.weights.describe() if self.weights is not None else self.checkpoint.name

    @property
    def binary(self) -> bool:
        return self.recipe.num_outputs == 1

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing the run was trained with (same code path at inference)."""
        return self.recipe.preprocess.to_config()

    @property
    def inference_preprocess_config(self) -> PreprocessConfig:
        """The run's preprocessing for a new image: `preprocess_config` with ``mask_source="model"``.

        A new image has no manifest mask, so its lungs come from the U-Net (as in
        ``covidcxr predict`` and the service); everything else is what training used.
        """
        return self.preprocess_config.model_copy(update={"mask_source": "model"})

    @property
    def name(self) -> str:
        return str(self.recipe.name or self.run_dir.name)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.recipe.preprocess.size)  # type: ignore[return-value]

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` or ``(N, 1, H, W)`` in [0, 1] -> the network's input tensor ``(N, C, H, W)``.

        The same normalisation as training (`CXRClassifierModule._inputs`); a 3-channel
        network gets the grey image repeated.
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images.float()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise CovidCXRError(f"model inputs must be (N, H, W) or (N, 1, H, W) grey images; got shape {tuple(x.shape)}")
        x = (x - self.recipe.model.normalize_mean) / self.recipe.model.normalize_std
        channels = self.recipe.model.in_channels
        return x.repeat(1, channels, 1, 1) if channels > 1 else x

    def _batches(self, images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield self.normalize(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)

    def probabilities_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid (binary: ``(N,)``) or softmax (``(N, K)``) of the logits divided by the run's temperature."""
        logits = logits.float()
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.sigmoid(logits[:, 0]) if self.binary else torch.softmax(logits, dim=1)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities for model inputs ``(N, H, W)`` in [0, 1].

        Returns:
            ``(N,)`` positive-class probabilities for a binary run, ``(N, K)`` otherwise.
        """
        out = [self.probabilities_from_logits(self.model(x)) for x in self._batches(np.asarray(images), batch_size)]
        if not out:
            return np.zeros((0,) if self.binary else (0, len(self.classes)), dtype=np.float64)
        return torch.cat(out).numpy().astype(np.float64)

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 16, on_error: str = "raise") -> pd.DataFrame:
        """Probabilities and decisions for image files, through the run's own preprocessing.

        Each file is screened, read, equalised, segmented, masked/cropped and resized by
        `covidcxr.preprocess.pipeline.preprocess_batch` with `inference_preprocess_config` —
        the code path training used — then classified at the run's temperature and threshold.

        Args:
            paths: PNG, JPEG, TIFF, BMP or DICOM files (format from content).
            batch_size: images preprocessed and classified together (bounds memory).
            on_error: ``"raise"`` (the first unusable file raises, naming it) or ``"record"``
                (its row has NaN probabilities and the reason in ``error``).

        Returns:
            One row per path, in order: ``image`` (the path), ``probability`` (binary: the
            positive class's; multi-class: ``prob_<class>`` columns), ``decision`` (the class
            decided: binary at `threshold`, else argmax), ``threshold``, ``lung_warning`` (why
            the segmentation is implausible — an empty mask, a crop too small — else None;
            training would have excluded such an image) and ``error``.

        Raises:
            CovidCXRError: an unusable file with ``on_error="raise"``; a bad ``on_error``.

        Example:
            >>> run = load_run("runs/demo")                                   # doctest: +SKIP
            >>> table = run.predict_files(sorted(Path("new").glob("*.png")))  # doctest: +SKIP
            >>> table["decision"].value_counts().to_dict()                    # doctest: +SKIP
            {'other': 7, 'covid': 3}
        """
        return self._predict_items([(p, None) for p in paths], [str(p) for p in paths], batch_size, on_error)

    def predict_array(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 16, on_error: str = "raise") -> pd.DataFrame:
        """Probabilities and decisions for images already in memory, through the run's own preprocessing.

        As `predict_files`, for images as `covidcxr.io.read_image` returns them: each an
        ``(H, W)`` grey array in [0, 1] at its native size (not a model input: for those use
        `predict`). The file-header screening (format, declared size) does not apply; the
        pixel screening (blank, test pattern) does.

        Args:
            images: an ``(N, H, W)`` array or a sequence of ``(H_i, W_i)`` arrays.
            batch_size, on_error: as `predict_files`.

        Returns:
            As `predict_files`, with ``image`` the position in ``images``.

        Example:
            >>> from covidcxr.io import read_image
            >>> run = load_run("runs/demo")                                          # doctest: +SKIP
            >>> run.predict_array([read_image("cxr.png").pixels])["probability"][0]  # doctest: +SKIP
            0.912
        """
        if isinstance(images, np.ndarray) and images.ndim == 2:
            raise CovidCXRError(f"predict_array takes (N, H, W) or a list of (H, W) images; got one (H, W) image of shape {images.shape}: pass [image]")
        items = [(np.asarray(image), None) for image in images]
        return self._predict_items(items, list(range(len(items))), batch_size, on_error)

    def _predict_items(self, items: list[tuple[Any, None]], names: list[Any], batch_size: int, on_error: str) -> pd.DataFrame:
        from covidcxr.preprocess.pipeline import load_segmenter, preprocess_batch

        if on_error not in ("raise", "record"):
            raise CovidCXRError(f"on_error must be 'raise' or 'record'; got {on_error!r}")
        if batch_size < 1:
            raise CovidCXRError(f"batch_size must be at least 1; got {batch_size}")
        config = self.inference_preprocess_config
        if self._segmenter is None and config.uses_model:
            self._segmenter = load_segmenter(config.segmenter_weights)
        width = 1 if self.binary else len(self.classes)
        probabilities = np.full((len(items), width), np.nan)
        lung_warning: list[str | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            results = preprocess_batch(items[start : start + batch_size], config, self._segmenter, screen=True)
            usable = []
            for offset, result in enumerate(results):
                i = start + offset
                if isinstance(result, CovidCXRError):
                    text = str(result)
                    named = isinstance(names[i], str) and names[i] in text  # a file's error names it already
                    errors[i] = text if named else f"image {names[i]}: {text}"
                    if on_error == "raise":
                        raise CovidCXRError(errors[i])
                    continue
                lung_warning[i] = result.rejected_reason
                usable.append((i, result.image))
            if usable:
                predicted = self.predict(np.stack([image for _, image in usable]), batch_size=batch_size)
                probabilities[[i for i, _ in usable]] = predicted.reshape(len(usable), width)
        return self._decision_table(names, probabilities, lung_warning, errors)

    def _decision_table(self, names: list[Any], probabilities: np.ndarray, lung_warning: list[str | None], errors: list[str | None]) -> pd.DataFrame:
        """One row per image: probabilities, the decision at the run's operating point, warnings, errors."""
        valid = ~np.isnan(probabilities).any(axis=1)
        if self.binary:
            columns: dict[str, Any] = {"probability": probabilities[:, 0]}
            decided = np.where(probabilities[:, 0] >= self.threshold, self.classes[1], self.classes[0])
            threshold: float | None = self.threshold
        else:
            columns = {f"prob_{name}": probabilities[:, k] for k, name in enumerate(self.classes)}
            decided = np.asarray(self.classes, dtype=object)[np.nan_to_num(probabilities, nan=-1.0).argmax(axis=1)]
            threshold = None
        return pd.DataFrame(
            {
                "image": names,
                **columns,
                "decision": [str(d) if ok else None for d, ok in zip(decided, valid)],
                "threshold": threshold,
                "lung_warning": lung_warning,
                "error": errors,
            }
        )

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pooled embeddings ``(N, D)`` (`CXRClassifier.embed`) for model inputs ``(N, H, W)``."""
        out = [self.model.embed(x).float() for x in self._batches(np.asarray(images), batch_size)]
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(out).numpy()


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Classifier run directories under ``runs_dir``, newest first.

    A run holds ``config.yaml`` and ``checkpoints/best.ckpt`` or ``last.ckpt``; a lung U-Net
    training directory (checkpoints, no ``config.yaml``) is not one.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found: dict[Path, float] = {}
    for name in CHECKPOINT_NAMES:
        for checkpoint in root.glob(f"**/{RunDir.CHECKPOINTS}/{name}.ckpt"):
            run = checkpoint.parent.parent
            if not RunDir(run).config.is_file():
                continue
            found[run] = max(found.get(run, 0.0), checkpoint.stat().st_mtime)
    return sorted(found, key=lambda p: found[p], reverse=True)


def latest_run(*roots: str | Path) -> Path:
    """The newest run directory under any of ``roots``.

    Raises:
        CovidCXRError: there is none (the message says where it looked and how to make one).
    """
    for root in roots:
        runs = find_runs(root)
        if runs:
            return runs[0]
    looked = ", ".join(str(Path(r)) for r in roots) or "(nowhere)"
    raise CovidCXRError(f"no trained run found under {looked}; train one (`make demo` trains demo/runs/finetune, or `covidcxr train RECIPE`) or name it with --run")


def load_run(run_dir: str | Path, checkpoint: str = "model", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run directory's model, settings and operating point.

    Args:
        run_dir: a run directory written by `covidcxr.train.run.train_recipe` (for k-fold
            runs, one ``fold-k`` directory).
        checkpoint: ``model`` (the run's model: its snapshot ensemble when its metrics come
            from one, else ``best.ckpt``, else ``last.ckpt``; `RunDir.weights`), ``best``
            (falls back to ``last``), ``last``, or a checkpoint file. The threshold and
            temperature are always the run's, chosen for its model.
        device: where the network goes.

    Raises:
        CovidCXRError: not a run directory, no usable checkpoint, a bad operating_point.json.

    Example:
        >>> run = load_run("runs/hall-small/fold-0")         # doctest: +SKIP
        >>> run.model_description, run.threshold             # doctest: +SKIP
        ('snapshot ensemble of 3 (snapshot-0.ckpt, snapshot-1.ckpt, snapshot-2.ckpt)', 0.41)
    """
    from covidcxr.models.ensemble import SnapshotEnsemble
    from covidcxr.train.module import load_checkpoint_model

    rd = RunDir(run_dir)
    root = rd.path
    if not root.is_dir():
        raise CovidCXRError(f"run {root} is not a directory")
    if Path(checkpoint).suffix == ".ckpt":
        weights = ModelWeights("checkpoint", (Path(checkpoint),))
    elif checkpoint == "model":
        weights = rd.weights()
    else:
        if checkpoint not in CHECKPOINT_NAMES:
            raise CovidCXRError(f"checkpoint must be 'model', one of {list(CHECKPOINT_NAMES)} or a .ckpt file; got {checkpoint!r}")
        names = CHECKPOINT_NAMES[CHECKPOINT_NAMES.index(checkpoint) :]
        candidates = [rd.checkpoints / f"{n}.ckpt" for n in names]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            folds = [f.path.name for f in rd.folds()]
            hint = f"; a k-fold run keeps one model per fold: name one of {folds}" if folds else ""
            raise CovidCXRError(f"run {root} has no checkpoints/best.ckpt or last.ckpt{hint}")
        weights = ModelWeights("checkpoint", (path,))
    loaded = [load_checkpoint_model(path) for path in weights.checkpoints]
    model, info = loaded[0]
    if weights.is_ensemble:
        model = SnapshotEnsemble([m for m, _ in loaded]).eval()
    recipe = recipe_from_mapping(info["recipe"])
    # channels-last: oneDNN's preferred layout for CPU convolutions; the same float32
    # arithmetic, ~1.35x faster for ResNet-18 at 224 px, batch 32, one thread
    # (``benchmarks/bench_serve.py``: what `evaluate --data` and predict spend most on).
    model.to(device, memory_format=torch.channels_last)
    point = rd.operating_point()
    return LoadedRun(
        run_dir=root,
        checkpoint=weights.checkpoints[0],
        model=model,
        recipe=recipe,
        classes=list(recipe.classes),
        threshold=0.5 if point.threshold is None else float(point.threshold),
        info=info,
        weights=weights,
        operating_point=point,
    )


def cached_inputs(
    records: pd.DataFrame, recipe: TrainRecipe, progress: bool = False
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, pd.DataFrame]:
    """Model inputs and lung masks of ``records`` through the run's preprocessing cache.

    Returns:
        ``(kept, images, lung_masks, excluded)``: the usable rows (index 0..n-1), their
        model inputs ``(n, H, W)`` float32 in [0, 1], their lung masks ``(n, H, W)`` bool in
        the model input's geometry, and the rows the preprocessing rejected with ``reason``.
    """
    from covidcxr.preprocess.cache import read_entry
    from covidcxr.train.data import prepare_records

    prepared = prepare_records(records, recipe, progress=progress)
    size = tuple(recipe.preprocess.size)
    images = np.zeros((len(prepared.entry_paths), *size), dtype=np.float32)
    masks = np.zeros((len(prepared.entry_paths), *size), dtype=bool)
    for i, path in enumerate(prepared.entry_paths):
        entry = read_entry(path)
        images[i] = entry.image
        masks[i] = entry.lung_mask
    return prepared.records.reset_index(drop=True), images, masks, prepared.excluded
