"""Training the lung U-Net (PyTorch Lightning): data, augmentation, the module, the run.

What `train_segmenter` does, and why:

* **Data**: every image of the collection that has a lung mask. Tartaglione et al. (2020,
  §3.2) train on Montgomery + Shenzhen only; we add the Cohen images' V7 Labs and General
  Blockchain masks, because the COVID images the classifier will see are mostly Cohen's
  figures-from-papers (low resolution, cropped, arrows and captions, AP supine films),
  which look nothing like the NLM tuberculosis-screening films.
* **Two annotation conventions, two outputs**: V7 masks include the lung behind the
  heart, the NLM and General Blockchain masks exclude the heart. One output trained on
  both would learn "V7 style for Cohen-looking images, NLM style for the rest" — the mask
  shape would then depend on the source, a shortcut the classifier could pick up. So the
  U-Net has one output channel per convention (`covidcxr.preprocess.lungs.CONVENTIONS`)
  and each channel is trained only on images annotated in its convention (a partial-label
  Dice+CE loss); the 60 Cohen images with both a V7 and a General Blockchain mask
  supervise both. `LungSegmenter` uses ``heart_excluded`` for every image by default.
* **Split**: patient-disjoint train/val/test over the masked images
  (`covidcxr.data.splits.split_train_val_test`, 70/30 then 80/20 as in Tartaglione et al.
  §3.2), stratified by source and annotator; near-duplicates stay together. Test
  patients are never used for training or early stopping; their images' SHA-1s are
  stored with the weights so `covidcxr segment evaluate` scores only them by default.
* **Sampling**: images are drawn with weight ``1/sqrt(n)`` of their source/annotator
  group, so 7 Montgomery training films are not drowned by ~190 V7 Cohen figures.
* **Augmentation** (MONAI dictionary transforms): rigid only — rotation ±10°, translation
  ±7 %, scaling ±12 %; no flips (the lungs are asymmetric: the heart is on the left),
  no elastic deformation (it would deform the anatomy the masks describe) — plus
  intensity: gamma, contrast/brightness, blur, Gaussian noise.
* **Loss**: MONAI ``DiceCELoss`` (Dice + binary cross-entropy on the logits).
* **Speed**: every image is decoded once, at the training size, into memory; training
  runs in bf16 autocast with channels-last tensors on CPU (about 2x faster on AVX-512/AMX).
* **Robustness**: early stopping on validation Dice, best checkpoint kept, checkpoints
  written atomically; a run folder that holds ``last.ckpt`` is resumed.
* **Self-training** (``pseudo_share`` > 0; `pseudo_label`): a teacher U-Net labels the
  collection's unmasked images (none from a validation/test patient); confident,
  anatomically plausible masks join the training draws under the full augmentation
  (noisy student, Xie et al. 2020; FixMatch-style filtering, Sohn et al. 2020).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covidcxr.data.manifest import file_sha1, is_missing
from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text, clean_stale_temps
from covidcxr.io.checkpoint import read_checkpoint
from covidcxr.preprocess.lungs import (
    LungSegmenter,
    SegmenterConfig,
    build_unet,
    evaluate_segmenter,
    load_model,
    mask_convention,
    prepare_image,
    prepare_mask,
    save_weights,
)

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of `train_segmenter` (stored with the run and the weights).

    Attributes:
        epochs: maximum epochs (early stopping usually ends sooner).
        size: network input side in pixels.
        seed: seed of the split, the sampler, the augmentation and the initialisation.
        batch_size: images per optimisation step.
        lr: peak learning rate (AdamW; 5 % linear warm-up, then cosine decay to lr/100).
        weight_decay: AdamW weight decay.
        patience: epochs without a better validation Dice before stopping.
        max_minutes: wall-clock budget for fitting (None: unlimited); counts across resumes.
        width: channels of the first U-Net level (doubling at each of the 5 levels).
        channels: explicit U-Net channels (overrides ``width``; for tiny test models).
        num_res_units: MONAI residual units per block.
        test_size: test fraction of the masked images (Tartaglione et al.: 0.3).
        val_size: validation fraction of the rest (Tartaglione et al.: 0.2).
        fast: bf16 autocast + channels-last (CPU); False trains in float32.
        threads: torch intra-op threads (None: torch's default, one per core). On a CPU
            shared with other jobs, 1 thread can be 2-5x faster than 2: oversubscribed
            OpenMP threads wait for each other at every operation.
        opacity_prob: probability of pasting synthetic opacities into a training image's
            lungs (`covidcxr.preprocess.lung_augment.RandLungOpacityd`); 0 turns it off.
        site_prob: probability of each site-imitating transform (down-up sampling, JPEG,
            Poisson noise, collimation; `lung_augment.site_transforms`); 0 turns them off.
        loss: ``"dice_ce"`` (MONAI DiceCELoss) or ``"tversky_ce"`` (the recall-weighted
            Tversky loss, alpha 0.3 / beta 0.7, + cross-entropy; Salehi et al. 2017): a
            missed lung pixel costs more than a spurious one.
        init_weights: start from these U-Net weights (e.g. the shipped ``lung_unet.pt``,
            trained on the same split) instead of a random initialisation: fine-tuning.
        pseudo_share: semi-supervised self-training (`pseudo_label`): the expected share of
            each epoch's draws taken from confidently pseudo-labelled unlabelled images of
            the collection; 0 turns it off. The labelled draws per epoch stay the same.
        pseudo_keep: the share of the anatomically plausible pseudo-labels kept, the most
            confident first.
        teacher: the weights that pseudo-label (default: ``init_weights``, else the shipped ones).
    """

    epochs: int = 150
    size: int = 256
    seed: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 30
    max_minutes: float | None = None
    width: int = 16
    channels: tuple[int, ...] | None = None
    num_res_units: int = 2
    test_size: float = 0.3
    val_size: float = 0.2
    fast: bool = True
    threads: int | None = None
    opacity_prob: float = 0.0
    site_prob: float = 0.0
    loss: str = "dice_ce"
    init_weights: str | None = None
    pseudo_share: float = 0.0
    pseudo_keep: float = 0.5
    teacher: str | None = None

    def segmenter_config(self) -> SegmenterConfig:
        channels = tuple(self.channels) if self.channels else tuple(self.width * 2**i for i in range(5))
        return SegmenterConfig(
            input_size=self.size,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=self.num_res_units,
            norm="batch",
        )

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes."""
        keys = ("size", "seed", "batch_size", "width", "channels", "num_res_units", "test_size", "val_size")
        identity = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}
        # options left at their defaults stay out, so runs started before they existed still resume
        defaults = TrainSettings()
        for key in ("opacity_prob", "site_prob", "loss", "init_weights", "pseudo_share", "pseudo_keep", "teacher"):
            if getattr(self, key) != getattr(defaults, key):
                identity[key] = getattr(self, key)
        return identity


# ---------------------------------------------------------------- split and data


def masked_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows that have a lung mask (the segmentation data)."""
    rows = manifest[~manifest["mask"].map(is_missing)].reset_index(drop=True)
    if rows.empty:
        raise CovidCXRError("no image in this collection has a lung mask (manifest column 'mask'); nothing to train on")
    return rows


def image_sha1s(rows: pd.DataFrame) -> list[str]:
    """The manifest's ``sha1`` per row, computed from the file where the manifest has none."""
    return [str(s) if not is_missing(s) else file_sha1(p) for s, p in zip(rows["sha1"], rows["image"])]


def annotator(rows: pd.DataFrame) -> pd.Series:
    """``source/mask_source`` per row (``source`` alone when the manifest has no ``mask_source``)."""
    if "mask_source" not in rows.columns:
        return rows["source"].astype(str)
    return rows["source"].astype(str) + "/" + rows["mask_source"].map(lambda v: "unspecified" if is_missing(v) else str(v))


def split_masked(manifest: pd.DataFrame, seed: int = 0, test_size: float = 0.3, val_size: float = 0.2) -> pd.DataFrame:
    """Patient-disjoint train/val/test split of the masked images, stratified by source and annotator.

    Stratifying by annotator too (the brief's ``("source",)`` plus ``mask_source``) puts
    ~30 % of the 32 Cohen images annotated only by General Blockchain in the test set, so
    each convention is measured on held-out patients.

    Returns:
        The masked rows with a ``split`` column (``train``/``val``/``test``) and an ``annotator`` column.
    """
    from covidcxr.data.splits import split_train_val_test

    rows = masked_rows(manifest)
    rows["annotator"] = annotator(rows)
    return split_train_val_test(rows, test_size=test_size, val_size=val_size, stratify=("annotator",), seed=seed)


@dataclass
class SegmentationArrays:
    """The decoded training data, in memory at the network's input size.

    Attributes:
        images: ``(N, 1, S, S)`` float32, prepared like `LungSegmenter` prepares its input.
        labels: ``(N, C, S, S)`` uint8, one channel per convention (`CONVENTIONS`).
        has: ``(N, C)`` bool, whether image ``n`` has a reference mask in convention ``c``.
    """

    images: np.ndarray
    labels: np.ndarray
    has: np.ndarray


def decode_rows(rows: pd.DataFrame, config: SegmenterConfig, show_progress: bool = True) -> SegmentationArrays:
    """Decode every row's image and masks once, at ``config.input_size`` (446 images at 256 px: ~120 MB).

    The primary ``mask`` fills the channel of its convention (``mask_source``); a second
    annotator's ``mask_alt`` fills the other channel when its convention differs.
    """
    from covidcxr.io import read_image, read_mask
    from covidcxr.parallel import make_progress

    size, conventions = config.input_size, list(config.conventions)
    n = len(rows)
    images = np.zeros((n, 1, size, size), np.float32)
    labels = np.zeros((n, len(conventions), size, size), np.uint8)
    has = np.zeros((n, len(conventions)), bool)
    with make_progress(transient=True) as progress:
        task = progress.add_task("decoding masked images", total=n, visible=show_progress)
        for i, row in enumerate(rows.to_dict("records")):
            pixels = read_image(row["image"]).pixels
            images[i, 0], placement = prepare_image(pixels, size, config.equalization)
            for column in ("mask", "mask_alt"):
                if is_missing(row.get(column)):
                    continue
                convention = mask_convention(row.get(f"{column}_source" if column != "mask" else "mask_source"))
                channel = conventions.index(convention) if convention in conventions else 0
                if has[i, channel]:
                    continue  # same convention twice: the primary mask wins
                labels[i, channel] = prepare_mask(read_mask(row[column], pixels.shape), placement)
                has[i, channel] = True
            progress.advance(task)
    return SegmentationArrays(images, labels, has)


def build_augmentation(size: int, seed: int = 0, opacity_prob: float = 0.0, site_prob: float = 0.0):
    """MONAI dictionary transforms: rigid (±10°, ±7 % shift, ±12 % scale) + intensity.

    With ``opacity_prob`` > 0, synthetic opacities are pasted into the (transformed) lungs
    right after the rigid transform; with ``site_prob`` > 0 the site-imitating transforms
    follow the intensity ones (`covidcxr.preprocess.lung_augment`).

    No flips (left/right lungs differ: the heart is on the patient's left) and no elastic
    deformation (it would change the anatomy the masks describe). Intensity augmentation
    acts after equalisation: equalisation already removes any monotone intensity change,
    so what remains to learn is robustness to residual gamma/contrast, blur and noise.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    from covidcxr.preprocess.lung_augment import RandLungOpacityd, site_transforms

    transform = Compose(
        [
            RandAffined(
                keys=("image", "label"),
                prob=0.9,
                rotate_range=(math.radians(10.0),),
                translate_range=(0.07 * size, 0.07 * size),
                scale_range=(0.12, 0.12),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *([RandLungOpacityd(prob=opacity_prob)] if opacity_prob > 0 else []),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys="image", factors=0.2, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandGaussianSmoothd(keys="image", sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), prob=0.2),
            RandGaussianNoised(keys="image", prob=0.3, mean=0.0, std=0.03),
            *(site_transforms(site_prob) if site_prob > 0 else []),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


class SegmentationDataset(torch.utils.data.Dataset):
    """Rows ``indices`` of `SegmentationArrays`, optionally augmented: ``(image, label, has)`` tensors."""

    def __init__(self, arrays: SegmentationArrays, indices: Sequence[int], transform=None):
        self.arrays, self.indices, self.transform = arrays, np.asarray(indices, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        j = int(self.indices[item])
        image = torch.from_numpy(self.arrays.images[j])
        label = torch.from_numpy(self.arrays.labels[j]).float()
        if self.transform is not None:
            data = self.transform({"image": image, "label": label})
            image, label = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"]).float()
            image = image.clamp(0.0, 1.0)
        return image.contiguous(), label.contiguous(), torch.from_numpy(self.arrays.has[j])


# ---------------------------------------------------------------- self-training on unlabelled images

#: A teacher pixel is "uncertain" when its lung probability lies in this open band.
UNCERTAIN_BAND: tuple[float, float] = (0.1, 0.9)


def unlabelled_rows(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """The images without a lung mask that may be pseudo-labelled: none shares a patient,
    a near-duplicate group or a file (SHA-1) with a validation or test image of ``split``.

    Without this, an unmasked Cohen film of a test patient (or the same figure under another
    name) would be fitted to the teacher's mask and leak into the held-out Dice.

    Args:
        manifest: the whole collection.
        split: `split_masked`'s output (``split``; ``patient_id``, ``dup_group``, ``sha1`` where present).
    """
    held = split[split["split"] != "train"]
    rows = manifest[manifest["mask"].map(is_missing)] if "mask" in manifest.columns else manifest
    keep = np.ones(len(rows), bool)
    for column in ("patient_id", "dup_group", "sha1"):
        if column in rows.columns and column in held.columns:
            taken = {str(v) for v in held[column] if not is_missing(v)}
            keep &= ~rows[column].map(lambda v: not is_missing(v) and str(v) in taken).to_numpy(bool)
    return rows[keep].reset_index(drop=True)


def pseudo_confidence(probability: np.ndarray, mask: np.ndarray) -> float:
    """1 − (pixels the teacher is unsure about) / (pixels of the mask): ``(S, S)`` maps -> a score <= 1.

    The mean max-probability over the whole canvas would be dominated by easy background
    (most of the image), so uncertainty is counted in ``UNCERTAIN_BAND`` and set against
    the lung area: a mask with a 2-px fuzzy rim scores ~0.9, a lung half lost in a grey
    consolidation far lower. FixMatch (Sohn et al. 2020, NeurIPS) keeps only predictions
    above a confidence threshold; this is its image-level analogue for segmentation.
    """
    low, high = UNCERTAIN_BAND
    uncertain = int(((probability > low) & (probability < high)).sum())
    return float(1.0 - uncertain / max(1, int(mask.sum())))


def plausible_lungs(mask: np.ndarray, area_range: tuple[float, float]) -> bool:
    """Anatomical plausibility of a pseudo-label: two lungs, of similar height, of a usual size.

    * two components (`lung_coverage.lung_height_ratio` gives NaN otherwise);
    * the shorter lung reaches at least `screening.OPACITY_CUT_HEIGHT_RATIO` (0.8) of the
      taller one's height — the QC rule for a mask that cut away a consolidated lower zone,
      so the teacher's cut masks are never taught to the student;
    * the mask's share of the canvas lies in ``area_range`` (the range of the annotated masks).
    """
    from covidcxr.preprocess.lung_coverage import lung_height_ratio
    from covidcxr.preprocess.screening import OPACITY_CUT_HEIGHT_RATIO

    share = float(mask.mean())
    if not area_range[0] <= share <= area_range[1]:
        return False
    ratio = lung_height_ratio(mask)
    return bool(np.isfinite(ratio) and ratio >= OPACITY_CUT_HEIGHT_RATIO)


def pseudo_label(
    teacher: LungSegmenter, arrays: SegmentationArrays, rows: pd.DataFrame, keep: float, area_range: tuple[float, float]
) -> tuple[SegmentationArrays, pd.DataFrame]:
    """Noisy-student pseudo-labels: the teacher's post-processed masks on clean inputs, filtered.

    Self-training after Xie et al. 2020 ("Self-training with Noisy Student improves
    ImageNet classification", CVPR): the teacher labels the *clean* image; the student is
    then trained on these labels under strong noise (the rigid, intensity, site and opacity
    augmentation of `build_augmentation`, applied to image and pseudo-label together). The
    student is thus asked to give the same lungs on a heavily augmented view as the teacher
    gave on the plain one — the weak/strong consistency of FixMatch (Sohn et al. 2020).
    Only confident (`pseudo_confidence`), anatomically plausible (`plausible_lungs`) masks
    are kept, in **both** conventions' channels: an image whose either mask fails is dropped.

    Args:
        teacher: the segmenter that labels (its network is run on the prepared canvases).
        arrays: the unlabelled images, prepared at the teacher's input size (`decode_rows`).
        rows: their manifest rows (same order).
        keep: share of the plausible images kept, the most confident first (0-1].
        area_range: (low, high) share of the canvas a plausible mask covers.

    Returns:
        The kept images with their pseudo-labels (``has`` all True), and a per-image table
        (image, source, label, confidence, plausible, kept).
    """
    from covidcxr.preprocess.lungs import postprocess_mask

    if not 0.0 < keep <= 1.0:
        raise CovidCXRError(f"pseudo_keep must be in (0, 1], got {keep}")
    n, channels = len(arrays.images), len(teacher.conventions)
    masks = np.zeros((n, channels) + arrays.images.shape[-2:], np.uint8)
    confidence = np.zeros(n)
    plausible = np.zeros(n, bool)
    for start in range(0, n, teacher.batch_size):
        probabilities = teacher.forward_prepared(arrays.images[start : start + teacher.batch_size])
        for offset, probability in enumerate(probabilities):
            i = start + offset
            scores, checks = [], []
            for c in range(channels):
                mask = postprocess_mask(probability[c], teacher.threshold)
                masks[i, c] = mask
                scores.append(pseudo_confidence(probability[c], mask))
                checks.append(plausible_lungs(mask, area_range))
            confidence[i], plausible[i] = min(scores), all(checks)
    candidates = np.flatnonzero(plausible)
    chosen = candidates[np.argsort(-confidence[candidates], kind="stable")][: int(math.ceil(keep * len(candidates)))]
    kept = np.zeros(n, bool)
    kept[chosen] = True
    chosen = np.sort(chosen)
    report = pd.DataFrame(
        {
            "image": rows["image"].astype(str).to_numpy(),
            "source": rows["source"].astype(str).to_numpy(),
            "label": rows["label"].astype(str).to_numpy() if "label" in rows.columns else "unknown",
            "confidence": confidence.round(4),
            "plausible": plausible,
            "kept": kept,
        }
    )
    pseudo = SegmentationArrays(arrays.images[chosen], masks[chosen], np.ones((len(chosen), channels), bool))
    return pseudo, report


def mask_area_range(arrays: SegmentationArrays, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The ``low``-``high`` percentile range of the annotated masks' share of the canvas (every channel)."""
    shares = arrays.labels.reshape(*arrays.labels.shape[:2], -1).mean(-1)[arrays.has]
    return float(np.percentile(shares, low)), float(np.percentile(shares, high))


def concat_arrays(first: SegmentationArrays, second: SegmentationArrays) -> SegmentationArrays:
    """``first`` followed by ``second`` (rows of `SegmentationArrays`)."""
    return SegmentationArrays(
        np.concatenate([first.images, second.images]), np.concatenate([first.labels, second.labels]), np.concatenate([first.has, second.has])
    )


# ---------------------------------------------------------------- the Lightning module


def partial_dice_ce(loss_fn, logits: torch.Tensor, labels: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Dice+CE averaged over conventions, each on the images annotated in it (a partial-label loss).

    Args:
        loss_fn: MONAI ``DiceCELoss(sigmoid=True)``.
        logits: ``(B, C, S, S)``; labels: ``(B, C, S, S)`` in {0, 1}; has: ``(B, C)`` bool.
    """
    terms = []
    for channel in range(logits.shape[1]):
        chosen = has[:, channel]
        if bool(chosen.any()):
            terms.append(loss_fn(logits[chosen, channel : channel + 1].float(), labels[chosen, channel : channel + 1]))
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).mean()


def make_loss(name: str):
    """``"dice_ce"``: MONAI ``DiceCELoss(sigmoid=True)``; ``"tversky_ce"``: recall-weighted.

    The Tversky index (Salehi et al. 2017, "Tversky loss function for image segmentation
    using 3D fully convolutional deep networks", MLMI) weighs false negatives by beta and
    false positives by alpha; alpha 0.3 / beta 0.7 makes a lung pixel cut away cost more
    than one added, the error that removes opacities. Cross-entropy is added as in DiceCE.
    """
    from monai.losses import DiceCELoss, TverskyLoss

    if name == "dice_ce":
        return DiceCELoss(sigmoid=True)
    if name == "tversky_ce":
        tversky = TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)
        bce = torch.nn.BCEWithLogitsLoss()
        return lambda logits, target: tversky(logits, target) + bce(logits, target)
    raise CovidCXRError(f"unknown segmentation loss {name!r}: expected dice_ce or tversky_ce")


class LungSegmentationModule(L.LightningModule):
    """The U-Net, its partial-label Dice+CE loss and per-convention validation Dice.

    Args:
        config: `SegmenterConfig.to_dict()` (kept as plain data so checkpoints load with
            ``weights_only=True``).
        lr: peak AdamW learning rate (warm-up, then cosine decay over the whole run).
        weight_decay: AdamW weight decay.
        channels_last: keep the network and its inputs in channels-last memory format.
    """

    def __init__(self, config: dict[str, Any], lr: float = 2e-3, weight_decay: float = 1e-4, channels_last: bool = True, loss: str = "dice_ce"):
        super().__init__()
        self.save_hyperparameters()
        self.config = SegmenterConfig.from_dict(config)
        self.net = build_unet(self.config)
        self.loss_fn = make_loss(loss)
        self.channels_last = channels_last
        self._val_dice: list[torch.Tensor] = []
        self._val_has: list[torch.Tensor] = []
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels, has = batch
        loss = partial_dice_ce(self.loss_fn, self(images), labels, has)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels, has = batch
        predicted = self(images).float() > 0.0
        truth = labels > 0.5
        intersection = (predicted & truth).flatten(2).sum(-1).float()
        total = predicted.flatten(2).sum(-1).float() + truth.flatten(2).sum(-1).float()
        dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))
        self._val_dice.append(dice.cpu())
        self._val_has.append(has.cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_dice:
            return
        dice, has = torch.cat(self._val_dice), torch.cat(self._val_has)
        self._val_dice, self._val_has = [], []
        per_channel = []
        for channel, name in enumerate(self.config.conventions):
            if bool(has[:, channel].any()):
                value = dice[has[:, channel], channel].mean()
                per_channel.append(value)
                self.log(f"val_dice_{name}", value, prog_bar=False)
        # early stopping watches the mean over conventions (each convention counts once)
        self.log("val_dice", torch.stack(per_channel).mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(0.05 * total))

        def factor(step: int) -> float:
            # linear warm-up from lr/10 over 5 % of the steps, then cosine down to lr/100.
            # A LambdaLR (not OneCycleLR): its state is only the step count, so a run resumed
            # with more --epochs simply stretches the schedule instead of failing.
            if step < warmup:
                return 0.1 + 0.9 * step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class EpochLine(Callback):
    """One plain line per epoch (for logs written without a terminal)."""

    def __init__(self, log: Callable[[str], None]):
        self.emit, self.start = log, time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs after the epoch's validation, so both the training loss and val Dice are in
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts += [f"{k} {metrics[k]:.4f}" for k in sorted(metrics) if k.startswith(("train_loss", "val_dice"))]
        parts.append(f"{(time.perf_counter() - self.start) / 60:.1f} min")
        self.emit("  ".join(parts))
        sys.stdout.flush()  # a log file written through a pipe should show every epoch as it ends


# ---------------------------------------------------------------- the run


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {split: {str(k): int(v) for k, v in part["annotator"].value_counts().sort_index().items()} for split, part in frame.groupby("split", sort=True)}


def _make_sampler(train_rows: pd.DataFrame, seed: int, n_pseudo: int = 0, pseudo_share: float = 0.0) -> torch.utils.data.WeightedRandomSampler:
    """Draws over the labelled training rows, then ``n_pseudo`` pseudo-labelled images.

    1/sqrt(group size): small sources (7 Montgomery films) are seen more often, without
    letting a handful of images dominate as full inverse-frequency weighting would. The
    pseudo-labelled images share ``pseudo_share`` of the probability uniformly, and the
    epoch grows so that it still draws as many labelled images as without them.
    """
    groups = train_rows["annotator"].to_numpy()
    sizes = pd.Series(groups).value_counts()
    weights = np.array([1.0 / math.sqrt(sizes[g]) for g in groups])
    samples = len(groups)
    if n_pseudo and pseudo_share > 0:
        if not 0.0 < pseudo_share < 1.0:
            raise CovidCXRError(f"pseudo_share must be in [0, 1), got {pseudo_share}")
        weights = np.concatenate([(1.0 - pseudo_share) * weights / weights.sum(), np.full(n_pseudo, pseudo_share / n_pseudo)])
        samples = int(round(len(groups) / (1.0 - pseudo_share)))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=samples, replacement=True, generator=generator)


def add_pseudo_labels(
    manifest: pd.DataFrame, frame: pd.DataFrame, arrays: SegmentationArrays, train_index: np.ndarray, settings: TrainSettings, show_progress: bool, log: Callable[[str], None]
) -> tuple[SegmentationArrays, np.ndarray, dict[str, Any]]:
    """Pseudo-label the collection's unlabelled images (`pseudo_label`) and append the kept ones to ``arrays``.

    Returns:
        The extended arrays, the indices of the pseudo-labelled images in them, and a
        summary for the metadata (pool, kept per source/label, thresholds, SHA-1s).
    """
    pool = unlabelled_rows(manifest, frame)
    if pool.empty:
        raise CovidCXRError("--pseudo-share: the collection has no image without a lung mask outside the validation/test patients")
    teacher_weights = settings.teacher or settings.init_weights
    teacher = LungSegmenter.load(teacher_weights, fast=settings.fast)
    config = settings.segmenter_config()
    if teacher.config.input_size != config.input_size or tuple(teacher.conventions) != tuple(config.conventions):
        raise CovidCXRError(f"teacher {teacher_weights or 'shipped weights'}: input size/conventions differ from these settings")
    area_range = mask_area_range(SegmentationArrays(arrays.images[train_index], arrays.labels[train_index], arrays.has[train_index]))
    log(f"pseudo-labelling {len(pool)} unlabelled images with {teacher_weights or 'the shipped weights'} ...")
    pool_arrays = decode_rows(pool, config, show_progress=show_progress)
    pseudo, report = pseudo_label(teacher, pool_arrays, pool, settings.pseudo_keep, area_range)
    del pool_arrays
    kept = report[report["kept"]]
    if kept.empty:
        log(f"no pseudo-label of the {len(report)} unlabelled images is plausible: training on the labelled images only")
    else:
        log(f"kept {len(kept)} of {len(report)} ({int(report['plausible'].sum())} plausible; confidence >= {kept['confidence'].min():.3f})")
    summary = {
        "method": "noisy-student self-training (Xie et al. 2020) with FixMatch-style confidence filtering (Sohn et al. 2020): "
        "teacher masks on clean inputs, post-processed, kept if both channels are plausible (two lungs, height ratio >= 0.8, "
        f"canvas share in the 1-99th percentile of the annotated masks {[round(v, 4) for v in area_range]}), most confident "
        f"{settings.pseudo_keep:.0%} kept; the student sees them under the full training augmentation",
        "teacher": teacher_weights or "shipped lung_unet.pt",
        "pool": int(len(report)),
        "plausible": int(report["plausible"].sum()),
        "kept": int(len(kept)),
        "min_confidence_kept": round(float(kept["confidence"].min()), 4) if len(kept) else None,
        "kept_by_source_label": {f"{k[0]}/{k[1]}": int(v) for k, v in kept.groupby(["source", "label"]).size().items()},
        "pool_by_source_label": {f"{k[0]}/{k[1]}": int(v) for k, v in report.groupby(["source", "label"]).size().items()},
        "share_of_draws": settings.pseudo_share,
        "kept_sha1": sorted(image_sha1s(pool[report["kept"].to_numpy()])),
    }
    start = len(arrays.images)
    return concat_arrays(arrays, pseudo), np.arange(start, start + len(pseudo.images)), summary


def validation_curve(run_dir: str | Path) -> list[float]:
    """Validation Dice per epoch, from the run's Lightning CSV logs (all versions, i.e. across resumes)."""
    curve: dict[int, float] = {}
    for path in sorted(Path(run_dir, "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        frame = pd.read_csv(path)
        if "val_dice" not in frame.columns:
            continue
        for epoch, value in frame.dropna(subset=["val_dice"]).groupby("epoch")["val_dice"].last().items():
            curve[int(epoch)] = round(float(value), 4)
    return [curve[e] for e in sorted(curve)]


def train_segmenter(
    data_dir: str | Path,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    run_dir: str | Path | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the lung U-Net on a collection's masked images; write weights + metadata to ``out``.

    Args:
        data_dir: a collection folder (``load_source``-readable) whose manifest has masks.
        out: folder for ``lung_unet.pt`` and ``lung_unet.json``.
        settings: the hyper-parameters.
        run_dir: folder for checkpoints and logs (default ``runs/lung_unet``); if it holds
            ``checkpoints/last.ckpt`` from a run with the same settings, training resumes from it.
        show_progress: Lightning's rich progress bar (a plain line per epoch otherwise).
        log: where progress lines go.
        command: the command line to record for reproduction.

    Returns:
        The metadata written to ``lung_unet.json`` (training summary, split, test metrics).

    Example:
        >>> train_segmenter("../shared/data/cxr", "weights/", TrainSettings(epochs=60))  # doctest: +SKIP
    """
    from covidcxr.data.sources import load_source

    started = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / "lung_unet"
    run_dir.mkdir(parents=True, exist_ok=True)
    # partial checkpoints of a killed run (an hour old: not those of a run writing right now)
    clean_stale_temps(run_dir / "checkpoints", min_age_s=3600)
    config = settings.segmenter_config()

    # resuming: the run folder must hold a run with the same settings
    identity_path = run_dir / "run_settings.json"
    identity = {"data_dir": str(data_dir), **settings.identity()}
    last = run_dir / "checkpoints" / "last.ckpt"
    if identity_path.is_file() and last.is_file():
        previous = json.loads(identity_path.read_text(encoding="utf-8"))
        if previous != identity:
            raise CovidCXRError(f"{run_dir} holds a run with other settings ({identity_path}: {previous}); use another --run-dir or delete it")
        log(f"resuming from {last}")
    else:
        last = None
    atomic_write_text(identity_path, json.dumps(identity, indent=2) + "\n")

    if settings.threads:
        torch.set_num_threads(settings.threads)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    manifest = load_source(data_dir).manifest
    frame = split_masked(manifest, seed=settings.seed, test_size=settings.test_size, val_size=settings.val_size)
    frame["sha1_key"] = image_sha1s(frame)
    counts = _counts(frame)
    log(f"masked images: {len(frame)}; split by patient: " + "; ".join(f"{s}: {sum(c.values())}" for s, c in counts.items()))
    fit_rows = frame[frame["split"] != "test"].reset_index(drop=True)
    arrays = decode_rows(fit_rows, config, show_progress=show_progress)
    train_index = np.flatnonzero(fit_rows["split"].to_numpy() == "train")
    val_index = np.flatnonzero(fit_rows["split"].to_numpy() == "val")
    pseudo_index, pseudo_summary = np.zeros(0, np.int64), None
    if settings.pseudo_share > 0:
        arrays, pseudo_index, pseudo_summary = add_pseudo_labels(manifest, frame, arrays, train_index, settings, show_progress, log)
    augmentation = build_augmentation(settings.size, settings.seed, settings.opacity_prob, settings.site_prob)
    train_set = SegmentationDataset(arrays, np.concatenate([train_index, pseudo_index]), augmentation)
    val_set = SegmentationDataset(arrays, val_index)
    sampler = _make_sampler(fit_rows.iloc[train_index], settings.seed, len(pseudo_index), settings.pseudo_share)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=settings.batch_size, sampler=sampler, drop_last=True, num_workers=0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=16, shuffle=False, num_workers=0)

    module = LungSegmentationModule(config.to_dict(), lr=settings.lr, weight_decay=settings.weight_decay, channels_last=settings.fast, loss=settings.loss)
    if settings.init_weights and last is None:
        initial, initial_config, _ = load_model(settings.init_weights)
        architecture = ("input_size", "channels", "strides", "num_res_units", "norm", "conventions")
        if any(initial_config.to_dict()[k] != config.to_dict()[k] for k in architecture):
            raise CovidCXRError(f"--init-weights {settings.init_weights}: its architecture differs from these settings ({initial_config.to_dict()})")
        module.net.load_state_dict(initial.state_dict())
        log(f"fine-tuning from {settings.init_weights}")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val_dice", mode="max", save_last=True, save_top_k=1, enable_version_counter=False
    )
    callbacks: list[Callback] = [checkpoint, EarlyStopping(monitor="val_dice", mode="max", patience=settings.patience)]
    if show_progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=False))
    else:
        callbacks.append(EpochLine(log))
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=settings.epochs,
        max_time=timedelta(minutes=settings.max_minutes) if settings.max_minutes else None,
        precision="bf16-mixed" if settings.fast else "32-true",
        callbacks=callbacks,
        logger=CSVLogger(run_dir, name="logs"),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        deterministic=True,
    )
    fit_started = time.perf_counter()
    if last is not None:
        read_checkpoint(last)  # refuses a tampered (pickled-code) or damaged checkpoint, naming it, before Lightning reads it
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last else None, weights_only=True)
    fit_minutes = (time.perf_counter() - fit_started) / 60

    best_path = Path(checkpoint.best_model_path or run_dir / "checkpoints" / "best.ckpt")
    if not best_path.is_file():
        raise CovidCXRError(f"training produced no checkpoint in {run_dir} (no validation epoch finished?)")
    best = read_checkpoint(best_path)
    state = {k.removeprefix("net."): v for k, v in best["state_dict"].items() if k.startswith("net.")}
    best_epoch = int(best.get("epoch", -1)) + 1
    model = build_unet(config)
    model.load_state_dict(state)
    segmenter = LungSegmenter(model, config, fast=settings.fast)

    test_rows = frame[frame["split"] == "test"].reset_index(drop=True)
    metrics: dict[str, Any] = {}
    if not test_rows.empty:
        log(f"scoring {len(test_rows)} held-out test images at their own resolution ...")
        metrics["test"] = evaluate_segmenter(segmenter, test_rows, convention="auto", show_progress=show_progress).summary
        metrics["test_heart_excluded_vs_mask"] = evaluate_segmenter(segmenter, test_rows, convention="heart_excluded", show_progress=show_progress).summary
        if "mask_alt" in test_rows.columns and (~test_rows["mask_alt"].map(is_missing)).any():
            metrics["test_vs_mask_alt"] = evaluate_segmenter(segmenter, test_rows, mask_column="mask_alt", convention="auto", show_progress=show_progress).summary
        for summary in metrics.values():
            for item in summary["worst"]:
                item["image"] = _relative(item["image"], data_dir)

    metadata = {
        "training": {
            "data_dir": str(data_dir),
            "command": command or "",
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
            "conventions": {
                "heart_excluded": "lung fields without the heart shadow (NLM Montgomery/Shenzhen, General Blockchain, phantoms)",
                "retrocardiac": "lung fields including the region behind the heart (V7 Labs)",
            },
            "images": counts,
            "epochs_run": int(trainer.current_epoch),
            "best_epoch": best_epoch,
            "best_val_dice": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
            "fit_minutes": round(fit_minutes, 2),
            "total_minutes": round((time.perf_counter() - started) / 60, 2),
            "loss": ("MONAI DiceCELoss(sigmoid=True)" if settings.loss == "dice_ce" else "MONAI TverskyLoss(alpha=0.3, beta=0.7) + BCE (recall-weighted)")
            + " per convention on the images annotated in it, averaged",
            "init_weights": settings.init_weights,
            "self_training": pseudo_summary,
            "optimizer": f"AdamW(lr={settings.lr}, weight_decay={settings.weight_decay}), 5% warm-up then cosine to lr/100 (per step)",
            "sampler": "with replacement, weight 1/sqrt(size of the image's source/annotator group)",
            "augmentation": "RandAffined(rotate ±10°, translate ±7%, scale ±12%, p=0.9), RandAdjustContrastd(gamma 0.6-1.6), "
            "RandScaleIntensityd(±20%), RandShiftIntensityd(±0.1), RandGaussianSmoothd(sigma 0.3-1.2), RandGaussianNoised(std 0.03)"
            + (f"; RandLungOpacityd(p={settings.opacity_prob}: 1-3 basal-biased opacities pasted into the lungs, mask unchanged)" if settings.opacity_prob else "")
            + (f"; site transforms (p={settings.site_prob} each: down-up sampling 0.3-0.9, JPEG 25-90, Poisson noise, collimation bands)" if settings.site_prob else ""),
            "precision": "bf16-mixed, channels_last" if settings.fast else "float32",
            "torch": torch.__version__,
            "val_dice_by_epoch": validation_curve(run_dir),
        },
        "split": {
            "method": "covidcxr.data.splits.split_train_val_test over the masked images, stratify=source/mask_source",
            "seed": settings.seed,
            "test_size": settings.test_size,
            "val_size": settings.val_size,
            "test": [
                {"image": _relative(r.image, data_dir), "sha1": r.sha1_key, "patient_id": r.patient_id, "source": r.source, "annotator": r.annotator}
                for r in test_rows.itertuples()
            ],
            "train_val_sha1": sorted(fit_rows["sha1_key"].tolist()),
        },
        "metrics": metrics,
    }
    weights_path = save_weights(model, config, out, metadata)
    log(f"wrote {weights_path} and {weights_path.with_suffix('.json')} (best epoch {best_epoch}, fit {fit_minutes:.1f} min)")
    return metadata


def command_line() -> str:
    """This process's command line, quoted, for the metadata."""
    return " ".join(shlex.quote(a) for a in ["covidcxr", *sys.argv[1:]])


__all__ = [
    "AtomicCheckpointIO",
    "LungSegmentationModule",
    "SegmentationArrays",
    "SegmentationDataset",
    "TrainSettings",
    "add_pseudo_labels",
    "build_augmentation",
    "concat_arrays",
    "decode_rows",
    "mask_area_range",
    "masked_rows",
    "partial_dice_ce",
    "plausible_lungs",
    "pseudo_confidence",
    "pseudo_label",
    "split_masked",
    "train_segmenter",
    "unlabelled_rows",
    "validation_curve",
]
