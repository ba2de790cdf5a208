"""Is an image far from what the model was trained on? A nearest-neighbour rule on every stage.

A classifier trained on a few sources answers confidently for anything; on a source it
never saw its AUC falls to 0.4-0.7 (Tartaglione et al. 2020; the project README). The
service cannot know an upload's source, but it can see whether the image *looks* like the
training images to the network itself — the k-nearest-neighbour rule of Sun et al. (2022,
"Out-of-distribution detection with deep nearest neighbors", ICML), applied to the pooled
output of **every backbone stage** (a feature ensemble, as Lee et al. 2018 did for the
Mahalanobis detector):

1. embed every **training** image of the run (``manifest.parquet`` rows with
   ``split == "train"``) through the preprocessing an upload takes (the run's
   `PreprocessConfig` with the lung U-Net as mask source): per stage ``s``, the pooled
   feature vector, L2-normalised;
2. the **stage score** ``d_s`` of an image is the Euclidean distance from its normalised
   stage-``s`` vector to the k-th nearest training vector (``k = 5``, fewer for tiny runs);
3. **calibrate** on in-distribution images: the run's **validation** images (held out
   from fitting) and the **training** images scored leave-one-out (each against the other
   training images, as Sun et al. set their threshold on training data); pooling both
   keeps the percentile meaningful for small runs. Each stage score is divided by its own
   99th calibration percentile, the image **score** is the largest of these ratios, and
   the **threshold** is the 99th percentile of the calibration images' scores.

Why every stage and not only the last (the embedding the audit uses): the last stage is
trained to ignore whatever does not predict the label, and that is what shifts between
domains. Measured with this rule (13 real radiographs per shared-collection source):

* demo run (ResNet-18 on 128-px phantoms): the last stage alone flagged 0-8 % of the real
  radiographs; the stage ensemble flags all 78, and 0/30, 3/30 and 5/30 of the held-out
  phantoms of the three training sites;
* ``small_shared`` (ResNet-18, 224 px, lungs masked, Cohen + Kermany): 0.8 % and 0.3 % of
  its Cohen and Kermany test images (the nominal 1 %), but also only 0/13 NIH, 0/13
  Montgomery, 1/13 Shenzhen and 1/13 Figure1 images — after equalisation and lung masking
  images of an unseen hospital look like the training images to the network.

The warning therefore means "unlike anything this model saw", not "from a hospital it
never saw"; the model card's seen/unseen metrics and the audit's findings speak to that.

An upload scoring above the threshold gets the ``out_of_distribution`` warning, with its
score, the threshold, the stage that is furthest off and the sources of its nearest
training neighbours (final stage).

The reference is computed once per run, **at the end of training** (`write_run_reference`,
called by `covidcxr.train.run.train_recipe`), and stored atomically in
``RUN/inference/reference.npz`` (`covidcxr.rundir.RunDir.reference`), keyed on the
checkpoint's SHA-1 and the inference preprocessing's config hash. Predict and serve only
read it; a run trained before this existed (or whose checkpoint or segmenter weights
changed) gets it built once, at the first load, with a message saying so.

Example:
    >>> engine = TorchClassifier(run)                                          # doctest: +SKIP
    >>> reference = load_or_build_reference(run, engine, engine.module.stage_sizes())  # doctest: +SKIP
    >>> scores, stages, nearest = reference.score(stage_embeddings)  # (N,), (N,), lists  # doctest: +SKIP
    >>> scores > reference.threshold  # flagged images                        # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path
from covidcxr.rundir import RunDir
from covidcxr.zoo import shipped_name

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = [
    "EmbeddingReference",
    "REFERENCE_FILE",
    "build_reference",
    "inference_recipe",
    "knn_scores",
    "load_or_build_reference",
    "write_run_reference",
]

#: The reference's path relative to a run directory (`RunDir.reference` owns it).
REFERENCE_FILE = RunDir(".").reference.relative_to(".")
K_NEIGHBOURS = 5
PERCENTILE = 99.0
# Up to this many training model inputs are kept (uint8) as realistic samples for the
# ONNX export's tolerance check.
SAMPLE_INPUTS = 8

EmbedFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _normalize(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def knn_scores(queries: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each query to its k-th nearest reference row, and the indices of its k nearest.

    Args:
        queries: ``(N, D)`` L2-normalised.
        reference: ``(M, D)`` L2-normalised.
        k: neighbours (clipped to what is available).
        exclude_self: the queries are the reference rows themselves (leave-one-out).

    Returns:
        ``(scores (N,), neighbours (N, k) int)``.

    Example:
        >>> ref = np.eye(3, dtype=np.float32)
        >>> scores, idx = knn_scores(ref[:1], ref, k=1)
        >>> float(scores[0]), int(idx[0, 0])
        (0.0, 0)
    """
    queries = np.asarray(queries, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    squared = (queries**2).sum(1)[:, None] + (reference**2).sum(1)[None, :] - 2.0 * queries @ reference.T
    distances = np.sqrt(np.clip(squared, 0.0, None))
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    available = reference.shape[0] - (1 if exclude_self else 0)
    k = max(1, min(k, available))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(distances, order[:, -1:], axis=1)[:, 0]
    return scores, order


def _split_stages(embeddings: np.ndarray, stage_sizes: list[int]) -> list[np.ndarray]:
    """``(N, sum D_s)`` -> one L2-normalised ``(N, D_s)`` block per stage."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape[1] != sum(stage_sizes):
        raise CovidCXRError(f"stage embeddings have {embeddings.shape[1]} features, the reference expects {sum(stage_sizes)} ({stage_sizes})")
    bounds = np.cumsum([0, *stage_sizes])
    return [_normalize(embeddings[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(eq=False)
class EmbeddingReference:
    """The training embeddings of a run, per stage, and the calibrated thresholds.

    Attributes:
        embeddings: ``(M, sum D_s)`` training stage embeddings, each stage block L2-normalised.
        stage_sizes: ``D_s`` per stage.
        stage_scales: each stage's 99th percentile of calibration scores (the divisor).
        sources: ``(M,)`` source of each training image.
        threshold: image scores (largest stage ratio) above this are out of distribution.
        calibration: which images calibrated it (``"val_and_train_leave_one_out"``).
        calibration_scores: the image scores the threshold was taken from (sorted).
        k: neighbours.
        key: what the reference was computed for (checkpoint SHA-1 + preprocessing hash).
        sample_inputs: up to `SAMPLE_INPUTS` training model inputs ``(S, H, W)`` uint8.
    """

    embeddings: np.ndarray
    stage_sizes: list[int]
    stage_scales: np.ndarray
    sources: np.ndarray
    threshold: float
    calibration: str
    calibration_scores: np.ndarray
    k: int
    key: str
    sample_inputs: np.ndarray

    def stage_blocks(self) -> list[np.ndarray]:
        bounds = np.cumsum([0, *self.stage_sizes])
        return [self.embeddings[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def score(self, stage_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Raw ``(N, sum D_s)`` stage embeddings -> ``(scores (N,), furthest stage (N,), nearest training sources)``."""
        ratios = []
        nearest: list[list[str]] = []
        for stage, (queries, train) in enumerate(zip(_split_stages(stage_embeddings, self.stage_sizes), self.stage_blocks())):
            distance, neighbours = knn_scores(queries, train, self.k)
            ratios.append(distance / self.stage_scales[stage])
            if stage == len(self.stage_sizes) - 1:
                nearest = [[str(self.sources[j]) for j in row] for row in neighbours]
        stacked = np.stack(ratios, axis=1)
        return stacked.max(axis=1), stacked.argmax(axis=1), nearest

    def percentile(self, score: float) -> float:
        """Share (in %) of the calibration images scoring at or below ``score``."""
        return float((self.calibration_scores <= score).mean() * 100.0) if self.calibration_scores.size else float("nan")

    def summary(self) -> dict[str, object]:
        """What the model card says about the rule."""
        return {
            "available": True,
            "rule": (
                f"per backbone stage, distance of the L2-normalised pooled features to the {self.k}-th nearest training image "
                f"(Sun et al. 2022), divided by that stage's {PERCENTILE:g}th calibration percentile; score = the largest ratio"
            ),
            "threshold": round(float(self.threshold), 6),
            "calibration": f"{PERCENTILE:g}th percentile of the {self.calibration.replace('_', ' ')} scores",
            "stages": len(self.stage_sizes),
            "n_train": int(len(self.embeddings)),
            "n_calibration": int(self.calibration_scores.size),
            "k": self.k,
            "limits": "flags images unlike any training image (another domain); images of an unseen hospital that look alike after preprocessing are not flagged",
        }

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle,
                    embeddings=self.embeddings,
                    stage_sizes=np.asarray(self.stage_sizes, dtype=np.int64),
                    stage_scales=np.asarray(self.stage_scales, dtype=np.float64),
                    sources=self.sources.astype(str),
                    threshold=np.float64(self.threshold),
                    calibration=np.array(self.calibration),
                    calibration_scores=self.calibration_scores,
                    k=np.int64(self.k),
                    key=np.array(self.key),
                    sample_inputs=self.sample_inputs,
                )

    @classmethod
    def load(cls, path: Path) -> EmbeddingReference:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                embeddings=data["embeddings"].astype(np.float32),  # a shipped model stores them as float16
                stage_sizes=[int(v) for v in data["stage_sizes"]],
                stage_scales=data["stage_scales"],
                sources=data["sources"],
                threshold=float(data["threshold"]),
                calibration=str(data["calibration"]),
                calibration_scores=data["calibration_scores"],
                k=int(data["k"]),
                key=str(data["key"]),
                sample_inputs=data["sample_inputs"],
            )


def inference_recipe(run: LoadedRun):
    """The run's recipe with ``mask_source: model``: how an upload (which has no manifest mask) is preprocessed."""
    preprocess = run.recipe.preprocess.model_copy(update={"mask_source": "model"})
    return run.recipe.model_copy(update={"preprocess": preprocess})


def reference_key(run: LoadedRun) -> str:
    """The model's weights fingerprint (`LoadedRun.weights_fingerprint`: every checkpoint of an ensemble) + the inference preprocessing's config hash."""
    config = inference_recipe(run).preprocess.to_config()
    return json.dumps({"checkpoint_sha1": run.weights_fingerprint, "preprocess": config.config_hash()}, sort_keys=True)


def build_reference(run: LoadedRun, embed: EmbedFn, stage_sizes: list[int], progress: bool = False) -> EmbeddingReference:
    """Embed the run's training and validation images and calibrate the thresholds.

    Args:
        run: the loaded run (its ``manifest.parquet`` names the images and splits).
        embed: ``(N, H, W) -> (probabilities, stage embeddings)`` (`covidcxr.serve.engines.TorchClassifier`).
        stage_sizes: width of each stage's block (`ClassifierOutputs.stage_sizes`).
        progress: show the preprocessing progress bar.

    Raises:
        CovidCXRError: no manifest, no training rows, or the training images are gone.
    """
    from covidcxr.train.inference import cached_inputs

    manifest_path = RunDir(run.run_dir).manifest
    if not manifest_path.is_file():
        raise CovidCXRError(f"run {run.run_dir} has no manifest.parquet: the training images are unknown")
    manifest = pd.read_parquet(manifest_path)
    if "split" not in manifest.columns:
        raise CovidCXRError(f"{manifest_path} has no 'split' column")
    rows = manifest[manifest["split"].isin(["train", "val"])].reset_index(drop=True)
    missing = [p for p in rows["image"].astype(str) if not Path(p).is_file()]
    if missing:
        raise CovidCXRError(f"{len(missing)} of the run's training/validation images are gone (e.g. {missing[0]})")
    kept, images, _, _ = cached_inputs(rows, inference_recipe(run), progress=progress)
    is_train = kept["split"].eq("train").to_numpy()
    if not is_train.any():
        raise CovidCXRError(f"run {run.run_dir}: no usable training image to compare uploads with")
    _, embeddings = embed(images)
    blocks = _split_stages(embeddings, stage_sizes)
    # Calibration images: every validation image (held out) and every training image
    # scored against the *other* training images (leave-one-out), as Sun et al. (2022)
    # calibrate on in-distribution training data. Pooling both keeps the 99th percentile
    # meaningful for small runs (a run with 14 validation images would otherwise take its
    # threshold from the single largest).
    n_train = int(is_train.sum())
    k = max(1, min(K_NEIGHBOURS, n_train - 1))
    per_stage = []
    for block in blocks:
        train = block[is_train]
        loo = knn_scores(train, train, k, exclude_self=True)[0] if n_train > 1 else np.zeros(0)
        val = knn_scores(block[~is_train], train, k)[0] if (~is_train).any() else np.zeros(0)
        per_stage.append(np.concatenate([val, loo]))
    scales = np.array([max(float(np.percentile(s, PERCENTILE)), 1e-6) for s in per_stage])
    calibration_scores = (np.stack(per_stage, axis=1) / scales).max(axis=1)
    samples = images[is_train][:SAMPLE_INPUTS]
    return EmbeddingReference(
        embeddings=np.concatenate([block[is_train] for block in blocks], axis=1),
        stage_sizes=list(stage_sizes),
        stage_scales=scales,
        sources=kept.loc[is_train, "source"].astype(str).to_numpy(),
        threshold=float(np.percentile(calibration_scores, PERCENTILE)),
        calibration="val_and_train_leave_one_out",
        calibration_scores=np.sort(calibration_scores).astype(np.float64),
        k=k,
        key=reference_key(run),
        sample_inputs=np.round(np.clip(samples, 0, 1) * 255).astype(np.uint8),
    )


def _say_nothing(_message: str) -> None:
    pass


def load_or_build_reference(
    run: LoadedRun,
    embed: EmbedFn,
    stage_sizes: list[int],
    rebuild: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> EmbeddingReference:
    """The stored reference of ``run`` if it is current, else build and store it (saying why through ``say``).

    Raises:
        CovidCXRError: it cannot be built (see `build_reference`).
    """
    path = RunDir(run.run_dir).reference
    key = reference_key(run)
    why = "none is stored (a run trained before references were written at the end of training)"
    if path.is_file() and not rebuild:
        try:
            reference = EmbeddingReference.load(path)
            if reference.key == key and reference.stage_sizes == list(stage_sizes):
                return reference
            why = "the stored one is for other weights or another preprocessing"
        except (OSError, ValueError, KeyError):
            why = "the stored one is unreadable"  # rebuilt below
    elif rebuild:
        why = "a rebuild was asked for"
    if shipped_name(run.run_dir) is not None:  # a packaged model is never written to (covidcxr.zoo)
        raise CovidCXRError(f"the shipped model's out-of-distribution reference {REFERENCE_FILE} cannot be used ({why}); reinstall covidcxr or rebuild the package (python -m covidcxr.zoo.package)")
    say(
        f"building the out-of-distribution reference of run {run.name!r} once ({why}): embedding its training and "
        f"validation images, with the lung U-Net, into {RunDir.INFERENCE}/{RunDir.REFERENCE}"
    )
    reference = build_reference(run, embed, stage_sizes, progress=progress)
    reference.save(path)
    return reference


def write_run_reference(run_dir: str | Path, progress: bool = False, say: Callable[[str], None] = _say_nothing) -> EmbeddingReference:
    """Build (or confirm) the stored reference of a finished run: the end-of-training hook.

    Example:
        >>> reference = write_run_reference("runs/demo")   # doctest: +SKIP
        >>> RunDir("runs/demo").reference.is_file()         # doctest: +SKIP
        True

    Raises:
        CovidCXRError: the run cannot be loaded or the reference cannot be built.
    """
    from covidcxr.serve.engines import TorchClassifier
    from covidcxr.train.inference import load_run

    run = load_run(run_dir)
    engine = TorchClassifier(run)
    return load_or_build_reference(run, engine, engine.module.stage_sizes(), progress=progress, say=say)
