"""Training recipes: one YAML file fully describes a training run (pydantic v2, validated).

A recipe has these sections (every field has a default except the data location; see
``recipes/demo.yaml`` for a commented example and ``covidcxr train --help``)::

    name: demo                      # run name (default: the recipe file's stem)
    seed: 0                         # L.seed_everything; also the split/compose/sampler seed
    data:                           # where images come from and what the task is
      collection: ../shared/data/cxr  | manifest: split.csv | synthetic: {n_images: 300, ...}
      task: covid_vs_rest | pneumonia_vs_normal | three_class | kermany3
      sources: [cohen]              # sources giving all their images ([] = every source)
      negatives_from: [kermany]     # sources lending negatives only (Tartaglione Table 1)
      negative_labels: [pneumonia]  # covid_vs_rest: which labels are negatives (default: every other)
      balance: borrow | subsample | none
      split: {kind: holdout | kfold | loso | given, test_size: 0.3, val_size: 0.2, folds: 10, fold: null, test_source: null}
    preprocess: {cache_dir: .cache/covidcxr, lungs: mask, size: 224, mask_source: model, ...}   # PreprocessConfig + cache
    model: {name: resnet18, head: default, pretrained: null, freeze: none}
    optimizer: {name: adam | adamw | sgd | rmsprop, lr: 1.0e-4, weight_decay: 0, momentum: null}
    schedule: {name: none | cyclic | cosine, base_lr, max_lr, step_size_epochs}
    train: {epochs: 10, batch_size: 32, balancing: sampler | class_weights | source_label | none, monitor: val_auc, checkpoint_every_n_steps: 50,
            single_label_sources: keep | exclude}
    early_stopping: {enabled: false, monitor: null, patience: 5}
    augmentation: {rotation_degrees: 0, translation: 0, hflip: 0,     # rigid only
                   acquisition: {prob: 0.5, gamma: [0.7, 1.5], contrast: [0.75, 1.25], blur_sigma: [0.25, 1.5], ...}}
    domain: {adversarial: {weight: 1.0, schedule: ganin}, group_dro: {eta: 0.01}}   # source-invariance
    snapshots: {count: 0, gap_epochs: 10, start: threshold, metric: val_accuracy, threshold: 0.8}
    operating_point: {rule: fixed | youden | sensitivity | specificity, value: 0.5, calibrate: none | temperature}
    engine: {accelerator: auto, devices: auto, num_nodes: 1, strategy: auto, precision: auto, channels_last: true, ...}
    output: {runs_dir: runs, run_dir: null}

`load_recipe(path, overrides)` reads the YAML, applies ``--set a.b=value`` overrides (the
value is parsed as a YAML scalar or flow collection: ``3``, ``1e-3``, ``null``,
``[cohen, figure1]``), resolves relative paths against the current directory and
validates. Every problem is reported as ``recipe field 'optimizer.lr': must be > 0
(got -1.0)``, one line per field, in a `RecipeError`.

The resolved recipe (every default filled in) is what a run saves as ``config.yaml``;
`TrainRecipe.config_hash` identifies the experiment (it leaves out what does not change
what is learned: the engine, the output location, the cache location, the number of
epochs — so a run can be resumed on other hardware, or trained for longer).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.pipeline import PreprocessConfig

__all__ = [
    "AcquisitionSection",
    "AdversarialSection",
    "AugmentationSection",
    "DataSection",
    "DomainSection",
    "GroupDROSection",
    "EarlyStoppingSection",
    "EngineSection",
    "ModelSection",
    "OperatingPointSection",
    "OptimizerSection",
    "OutputSection",
    "PreprocessSection",
    "RecipeError",
    "ScheduleSection",
    "SnapshotSection",
    "SplitSection",
    "SyntheticSection",
    "TASKS",
    "TrainRecipe",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "read_recipe_yaml",
    "recipe_from_mapping",
    "resolve_paths",
    "set_dotted",
]

#: task name -> class names, in target order (binary tasks: [negative, positive]).
TASKS: dict[str, tuple[str, ...]] = {
    "covid_vs_rest": ("rest", "covid"),
    "pneumonia_vs_normal": ("normal", "pneumonia"),
    "three_class": ("normal", "pneumonia", "covid"),
    "kermany3": ("normal", "bacterial", "viral"),
}

Task = Literal["covid_vs_rest", "pneumonia_vs_normal", "three_class", "kermany3"]
Metric = Literal["val_auc", "val_loss", "val_accuracy"]

# Augmentations that deform the anatomy (or its scale), refused with a reason instead of
# the generic "unknown field": Tartaglione et al. 2020 §3.2, "rigid transformations
# (translation, rotation) are the only data augmentation transformations safely applicable".
_NON_RIGID = {
    "elastic", "elastic_deformation", "shear", "scale", "scaling", "zoom", "crop", "random_crop",
    "random_resized_crop", "perspective", "distortion", "grid_distortion", "warp", "stretch",
}


class RecipeError(CovidCXRError):
    """A recipe (YAML or ``--set`` override) is invalid.

    Attributes:
        fields: the dotted names of the offending fields (``optimizer.lr``).
    """

    def __init__(self, message: str, fields: list[str] | None = None):
        self.fields = list(fields or [])
        super().__init__(message)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------- data


class ShortcutSection(_Section):
    """A shortcut planted in synthetic phantoms (`covidcxr.data.synth.ShortcutSpec`)."""

    kind: Literal["marker", "window", "view"] = "marker"
    site: str | None = None
    label: Literal["covid", "pneumonia", "normal", "other"] = "covid"
    strength: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    false_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05


class SyntheticSection(_Section):
    """Phantoms written by `covidcxr.data.synth.synthesize` (resumable, byte-identical per seed)."""

    n_images: Annotated[int, Field(ge=12, le=1_000_000)] = 300
    size: Annotated[int, Field(ge=32, le=2048)] = 256
    seed: int = 0
    shortcut: ShortcutSection | None = None
    images_per_patient: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (1, 2)
    #: one label mix for every site (e.g. {normal: 0.5, covid: 0.5}); None keeps each site's
    #: own mix — the default sites differ (site_c is COVID-rich), so the site is a shortcut
    label_mix: dict[Literal["covid", "pneumonia", "normal", "other"], Annotated[float, Field(ge=0.0)]] | None = None
    #: multiplies every finding's severity (`covidcxr.data.synth.synthesize`); 1.0: the default ranges
    finding_scale: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0

    @model_validator(mode="after")
    def _mix_sums_to_one(self) -> SyntheticSection:
        if self.label_mix is not None and not math.isclose(sum(self.label_mix.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"data.synthetic.label_mix: the probabilities must sum to 1; got {sum(self.label_mix.values()):g}")
        return self


class SplitSection(_Section):
    """How images are split, always by patient (and near-duplicate group).

    kind: ``holdout`` (train/val/test, Tartaglione §3.2: 70/30 then 80/20), ``kfold``
    (patient-grouped, Hall and Apostolopoulos: 10 folds; ``fold: null`` runs every fold),
    ``loso`` (leave ``test_source`` out as the unseen test set, Ben Ahmed), ``given`` (the
    manifest's own ``split`` column).
    """

    kind: Literal["holdout", "kfold", "loso", "given"] = "holdout"
    test_size: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    val_size: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    folds: Annotated[int, Field(ge=2, le=100)] = 10
    fold: Annotated[int, Field(ge=0)] | None = None
    test_source: str | None = None
    stratify: list[str] = Field(default_factory=lambda: ["source", "label"])
    seed: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SplitSection:
        if self.kind == "loso" and not self.test_source:
            raise ValueError("data.split.test_source: split.kind 'loso' needs (the source held out as unseen)")
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"data.split.fold: {self.fold} must be below split.folds ({self.folds})")
        return self


class DataSection(_Section):
    """Where the images come from, the task, and the training-set composition."""

    collection: str | None = None
    manifest: str | None = None
    synthetic: SyntheticSection | None = None
    adapter: str | None = None
    task: Task = "covid_vs_rest"
    sources: list[str] = Field(default_factory=list)
    negatives_from: list[str] = Field(default_factory=list)
    negative_labels: list[Literal["pneumonia", "normal", "other"]] | None = None
    balance: Literal["borrow", "subsample", "none"] = "borrow"
    balance_splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val"])
    views: list[Literal["PA", "AP", "AP Supine", "lateral", "unknown"]] | None = None
    split: SplitSection = Field(default_factory=SplitSection)

    @model_validator(mode="after")
    def _one_location(self) -> DataSection:
        given = [name for name in ("collection", "manifest") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError("data.manifest: give data.collection (a folder) or data.manifest (a file), not both")
        if not given and self.synthetic is None:
            raise ValueError("data.collection: name the images: data.collection (a folder), data.manifest (a file) or data.synthetic (phantoms)")
        if self.manifest and self.synthetic is not None:
            raise ValueError("data.synthetic: it writes a collection folder; use it with data.collection (or alone), not data.manifest")
        if self.negative_labels is not None and self.task != "covid_vs_rest":
            raise ValueError("data.negative_labels: only covid_vs_rest chooses its negatives (e.g. [pneumonia], Hall et al.)")
        if self.split.kind == "given" and not self.manifest and not self.collection:
            raise ValueError("data.split.kind: 'given' reads the split column of data.manifest or data.collection")
        return self


class PreprocessSection(PreprocessConfig):
    """The `PreprocessConfig` fields (flat), plus where the cache lives and how many workers fill it."""

    cache_dir: str = ".cache/covidcxr"
    workers: Annotated[int, Field(ge=1)] | None = None
    # what a cache entry stores (`covidcxr.preprocess.cache`): not part of the model input, so not hashed
    cache: Literal["full", "model_only"] = "full"

    def to_config(self) -> PreprocessConfig:
        """The pipeline settings alone (what keys the cache)."""
        return PreprocessConfig(**self.model_dump(exclude={"cache_dir", "workers", "cache"}))


# ---------------------------------------------------------------------------------- model


class ModelSection(_Section):
    """The network (`covidcxr.models.create_model`), its initialisation and freeze policy.

    pretrained: null (random init); a file (torchvision-named ImageNet state dict, or one
    of our checkpoints); a run directory of ours (its ``checkpoints/best.ckpt``; the
    two-stage recipe of Tartaglione §4.1-4.2); or a recipe YAML, trained first if its run
    is not finished, then used as a run directory.

    freeze: ``none``, ``backbone``, ``all_but_batchnorm`` (Ben Ahmed Finetune1),
    ``default`` (the model's paper recipe), ``{trainable_last_stages: k}`` (Finetune2) or
    ``{layer_cutoff: n}`` (Apostolopoulos "layer cutoff").
    """

    name: str = "resnet18"
    head: str = "default"
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: Annotated[int, Field(ge=1, le=3)] = 1
    pretrained: str | None = None
    freeze: str | dict[str, Any] = "none"
    normalize_mean: float = 0.449
    normalize_std: Annotated[float, Field(gt=0.0)] = 0.226
    #: train anyway when ``freeze`` keeps backbone weights that are random (no ``pretrained``):
    #: the run is recorded as hollow (`covidcxr.rundir.RunDir.warnings`, id ``random_frozen_backbone``)
    allow_random_frozen: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from covidcxr.models import get_model_cfg

        try:
            get_model_cfg(value)
        except CovidCXRError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_means_null(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "random"):
            return None
        return str(value) if isinstance(value, Path) else value

    @field_validator("freeze")
    @classmethod
    def _known_policy(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        from covidcxr.models import FREEZE_POLICIES

        if isinstance(value, str):
            if value != "default" and value not in FREEZE_POLICIES:
                raise ValueError(f"must be one of {sorted(FREEZE_POLICIES) + ['default']} or a dict policy")
            return value
        keys = set(value)
        if not (keys == {"trainable_last_stages"} or keys in ({"layer_cutoff"}, {"layer_cutoff", "count"})):
            raise ValueError("a dict policy is {trainable_last_stages: k} or {layer_cutoff: n[, count: keras|parametrised]}")
        number = value.get("trainable_last_stages", value.get("layer_cutoff"))
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"the policy's count must be a non-negative integer, not {number!r}")
        return value


# ----------------------------------------------------------------------------- optimisation


class OptimizerSection(_Section):
    """Adam (Ben Ahmed: 1e-4; Apostolopoulos), RMSprop (Hall), SGD or AdamW."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    nesterov: bool = False


class ScheduleSection(_Section):
    """Learning-rate schedule.

    cyclic: ``torch.optim.lr_scheduler.CyclicLR`` stepped every batch between ``base_lr``
    (default: ``optimizer.lr``) and ``max_lr``, a half cycle lasting ``step_size_epochs``
    epochs (Hall et al.: 1e-4 -> 1e-3, after Smith's CLR). cosine: ``CosineAnnealingLR``
    over ``t_max_epochs`` (default: all epochs) down to ``eta_min``, stepped each epoch.
    """

    name: Literal["none", "cyclic", "cosine"] = "none"
    base_lr: Annotated[float, Field(gt=0.0)] | None = None
    max_lr: Annotated[float, Field(gt=0.0)] | None = None
    step_size_epochs: Annotated[float, Field(gt=0.0)] = 2.0
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    t_max_epochs: Annotated[int, Field(ge=1)] | None = None
    eta_min: Annotated[float, Field(ge=0.0)] = 0.0

    @model_validator(mode="after")
    def _cyclic_bounds(self) -> ScheduleSection:
        if self.name == "cyclic" and self.max_lr is None:
            raise ValueError("schedule.max_lr: schedule 'cyclic' needs it (Hall et al.: 1e-3)")
        return self


class TrainSection(_Section):
    """Epochs, batches, class balancing, the checkpoint monitor and checkpoint frequency.

    balancing: ``sampler`` (a class-balanced ``WeightedRandomSampler``-style draw each
    epoch), ``class_weights`` (loss weights inverse to class frequency), ``source_label``
    (a draw in which every source weighs the same and, within a source, every label it has
    weighs the same: the label no longer predicts the source and the source no longer
    predicts the label, `covidcxr.train.data.sample_weights`) or ``none``.
    single_label_sources: ``exclude`` keeps sources whose training images all have one
    label out of the loss (never drawn): such a source can only teach the model to
    recognise the source (Tartaglione et al. 2020 §3.3; Maguolo & Nanni 2021).
    monitor: the validation metric that picks ``best.ckpt`` (``none``: the last epoch).
    checkpoint_every_n_steps: ``last.ckpt`` is also written every N optimizer steps, so a
    run killed mid-epoch loses at most N steps (0: only at epoch ends).
    """

    epochs: Annotated[int, Field(ge=1, le=100_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    balancing: Literal["sampler", "class_weights", "source_label", "none"] = "sampler"
    single_label_sources: Literal["keep", "exclude"] = "keep"
    monitor: Literal["val_auc", "val_loss", "val_accuracy", "none"] = "val_auc"
    checkpoint_every_n_steps: Annotated[int, Field(ge=0)] = 50
    accumulate_grad_batches: Annotated[int, Field(ge=1)] = 1
    gradient_clip_val: Annotated[float, Field(gt=0.0)] | None = None


class EarlyStoppingSection(_Section):
    """Stop when ``monitor`` has not improved for ``patience`` epochs (Ben Ahmed: 5)."""

    enabled: bool = False
    monitor: Metric | None = None
    patience: Annotated[int, Field(ge=1)] = 5
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


def _range(low_bound: float, high_bound: float) -> Any:
    return tuple[Annotated[float, Field(ge=low_bound, le=high_bound)], Annotated[float, Field(ge=low_bound, le=high_bound)]]


class AcquisitionSection(_Section):
    """Acquisition randomization (`covidcxr.train.augment`): intensity and resolution, never geometry.

    Each transform is applied to a training image with probability ``prob`` (``equalize``
    has its own probability); a range is ``[low, high]``, drawn uniformly per image; null
    turns that transform off. Simulates other scanners and digitisations (domain
    randomization, Tobin et al. 2017; Zhang et al. 2020, IEEE TMI 39:2531).

    gamma: display gamma (MONAI ``RandAdjustContrast``). contrast: contrast factor about
    the image mean (``RandScaleIntensityFixedMean``); brightness: ± offset
    (``RandShiftIntensity``) — together a random window. blur_sigma: Gaussian unsharpness
    in pixels (``RandGaussianSmooth``); sharpen: unsharp masking (``RandGaussianSharpen``).
    gaussian_noise: largest noise standard deviation (``RandGaussianNoise``);
    poisson_counts: photons at full intensity (quantum noise). jpeg_quality: a Pillow
    JPEG round-trip. downsample: down-then-up sampling ratio (resolution loss, same size).
    equalize: probability of histogram equalisation.
    """

    prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    gamma: _range(0.2, 5.0) | None = (0.7, 1.5)
    contrast: _range(0.1, 3.0) | None = (0.75, 1.25)
    brightness: Annotated[float, Field(ge=0.0, le=0.5)] | None = 0.05
    blur_sigma: _range(0.0, 5.0) | None = (0.25, 1.5)
    sharpen: bool = True
    gaussian_noise: Annotated[float, Field(ge=0.0, le=0.5)] | None = 0.03
    poisson_counts: _range(1.0, 1e6) | None = (200.0, 5000.0)
    jpeg_quality: tuple[Annotated[int, Field(ge=1, le=100)], Annotated[int, Field(ge=1, le=100)]] | None = (30, 95)
    downsample: _range(0.05, 1.0) | None = (0.35, 1.0)
    equalize: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2

    @model_validator(mode="before")
    @classmethod
    def _no_geometry(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _NON_RIGID:
                    raise ValueError(
                        f"augmentation.acquisition.{key}: not allowed: acquisition randomization changes intensities and "
                        "resolution only, never the geometry (Tartaglione et al. 2020, §3.2)"
                    )
        return data

    @model_validator(mode="after")
    def _ordered(self) -> AcquisitionSection:
        for name in ("gamma", "contrast", "blur_sigma", "poisson_counts", "jpeg_quality", "downsample"):
            value = getattr(self, name)
            if value is not None and value[0] > value[1]:
                raise ValueError(f"augmentation.acquisition.{name}: [low, high] with low <= high (got {list(value)})")
        return self


class AugmentationSection(_Section):
    """Rigid augmentation only, applied on the fly to training batches.

    rotation_degrees: uniform in ±degrees (Ben Ahmed: ±2°/±4°). translation: uniform
    shift in ± this fraction of each side. hflip: probability of a horizontal flip (Hall,
    Ben Ahmed). Never elastic or scaling (Tartaglione §3.2). acquisition: intensity and
    resolution randomization (`AcquisitionSection`), off (null) by default.
    """

    rotation_degrees: Annotated[float, Field(ge=0.0, le=45.0)] = 0.0
    translation: Annotated[float, Field(ge=0.0, le=0.3)] = 0.0
    hflip: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    acquisition: AcquisitionSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _rigid_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _NON_RIGID:
                    raise ValueError(
                        f"augmentation.{key}: not allowed: only rigid augmentation (rotation_degrees, translation, hflip) and "
                        "acquisition randomization (augmentation.acquisition: intensities, resolution) are "
                        "applied, because plastic deformations change the lung structure (Tartaglione et al. 2020, §3.2)"
                    )
        return data

    @property
    def enabled(self) -> bool:
        return self.rotation_degrees > 0 or self.translation > 0 or self.hflip > 0


class AdversarialSection(_Section):
    """Source-adversarial training (Ganin et al. 2016, JMLR 17:59, "Domain-adversarial training of neural networks").

    A small head predicts the training source from the pooled backbone features through a
    gradient-reversal layer (`covidcxr.train.domain.GradientReversal`): the head learns to
    recognise the source, the backbone is pushed to make it impossible.

    weight: the reversal coefficient λ at full strength. schedule ``ganin``: λ grows as
    ``weight * (2 / (1 + exp(-gamma * p)) - 1)`` with ``p`` the training progress in
    [0, 1] (Ganin et al. §5.2.2, gamma 10); ``constant``: ``weight`` throughout.
    hidden: width of the head's hidden layer.
    """

    weight: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    schedule: Literal["ganin", "constant"] = "ganin"
    gamma: Annotated[float, Field(gt=0.0)] = 10.0
    hidden: Annotated[int, Field(ge=1, le=4096)] = 128


class GroupDROSection(_Section):
    """GroupDRO over sources (Sagawa et al. 2020, ICLR, "Distributionally robust neural networks", Algorithm 1).

    The loss is a weighted sum of the per-source mean losses; the weights q are updated
    each step by exponentiated gradient, ``q_g <- q_g * exp(eta * loss_g)`` then
    normalised, so the worst source gets the most weight. eta: the step size η.
    """

    eta: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01


class DomainSection(_Section):
    """Learning across sources (`covidcxr.train.domain`): adversarial source head and/or GroupDRO (off by default)."""

    adversarial: AdversarialSection | None = None
    group_dro: GroupDROSection | None = None

    @property
    def enabled(self) -> bool:
        return self.adversarial is not None or self.group_dro is not None


class SnapshotSection(_Section):
    """Snapshot ensemble (Hall et al. 2020): ``count`` checkpoints ``gap_epochs`` apart, averaged.

    start ``threshold``: the first snapshot is the first epoch (not before
    ``start_epoch``) where ``metric`` exceeds ``threshold`` (Hall: validation accuracy >
    0.8, then 7 models 10 epochs apart). start ``last``: the last ``count`` epochs spaced by
    ``gap_epochs``, ending at the final epoch (Hall's first version).
    """

    count: Annotated[int, Field(ge=0, le=100)] = 0
    gap_epochs: Annotated[int, Field(ge=1)] = 10
    start: Literal["threshold", "last"] = "threshold"
    metric: Literal["val_accuracy", "val_auc", "train_accuracy"] = "val_accuracy"
    threshold: float = 0.8
    start_epoch: Annotated[int, Field(ge=0)] = 0


class OperatingPointSection(_Section):
    """The decision threshold, chosen on the validation split only at the end of training.

    rule: ``fixed`` (``value``, default 0.5), ``youden`` (Youden's J maximised; Youden
    1950), ``sensitivity`` (the highest threshold whose validation sensitivity reaches
    ``value``, default 0.9: the best specificity there) or ``specificity`` (the lowest
    threshold whose validation specificity reaches ``value``, default 0.9). calibrate
    ``temperature``: one temperature fitted on the validation logits (Guo et al. 2017,
    "On calibration of modern neural networks"); the stored probabilities are then the
    calibrated ones and inference divides the logit by the same temperature. Stored in
    ``RUN/operating_point.json`` (`covidcxr.rundir.OperatingPoint`) and used by evaluate,
    audit, report, predict and serve alike.
    """

    rule: Literal["fixed", "youden", "sensitivity", "specificity"] = "fixed"
    value: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    calibrate: Literal["none", "temperature"] = "none"

    @model_validator(mode="after")
    def _value_fits_rule(self) -> OperatingPointSection:
        if self.rule == "youden" and self.value is not None:
            raise ValueError("operating_point.value: rule 'youden' takes no value")
        if self.rule in ("sensitivity", "specificity") and self.value is not None and self.value <= 0.0:
            raise ValueError(f"operating_point.value: a target {self.rule} must be in (0, 1]")
        return self

    @property
    def target(self) -> float | None:
        """The value the rule uses: the fixed threshold (0.5) or the target (0.9); None for Youden."""
        if self.rule == "youden":
            return None
        if self.value is not None:
            return float(self.value)
        return 0.5 if self.rule == "fixed" else 0.9


class EngineSection(_Section):
    """Hardware: Lightning Trainer flags, so the same recipe runs on a laptop or a GPU cluster.

    precision ``auto``: ``bf16-mixed`` where the device computes bf16 natively (CUDA with
    bf16, or a CPU with AVX-512/AMX, where bf16 autocast + channels_last trains ResNet-18
    ~3x faster than fp32), else ``32-true``. deterministic: ``warn`` uses deterministic
    algorithms and warns where one has none (some CUDA kernels); ``true`` raises there.
    in_memory: keep decoded inputs in RAM (null: when they fit in 2 GiB).
    """

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: Annotated[int, Field(ge=1)] = 1
    strategy: str = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true"] = "auto"
    channels_last: bool = True
    num_workers: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=1)] | None = None
    deterministic: bool | Literal["warn"] = "warn"
    in_memory: bool | None = None
    progress_bar: bool = True

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class OutputSection(_Section):
    """Where the run directory goes (``run_dir``, else ``runs_dir/<name>``), what it keeps, where it is logged.

    None of these fields is part of the experiment's identity (`TrainRecipe.identity`).

    Attributes:
        keep: which checkpoints survive once the run is finished (`covidcxr.train.callbacks.keep_checkpoints`):
            ``all``; ``best`` (the model — ``best.ckpt`` and any snapshots — without
            ``last.ckpt``, so the run can no longer be trained further); ``last`` (only
            ``last.ckpt``: the run can be trained further, but its evaluated model is gone).
        tensorboard: also log to TensorBoard event files in ``RUN/tensorboard/`` (needs the
            ``tensorboard`` package: ``pip install covidcxr[tracking]``; absent, the run
            refuses to start and says so).
        mlflow: an MLflow tracking URI (``file:/path/mlruns``, ``http://host:5000``...) to log
            the run's parameters and metrics to (needs ``mlflow``: ``covidcxr[tracking]``).
    """

    runs_dir: str = "runs"
    run_dir: str | None = None
    keep: Literal["all", "best", "last"] = "all"
    tensorboard: bool = False
    mlflow: str | None = None


class TrainRecipe(_Section):
    """A whole training run. See the module docstring for the layout."""

    name: str | None = None
    seed: int = 0
    data: DataSection
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection)
    augmentation: AugmentationSection = Field(default_factory=AugmentationSection)
    domain: DomainSection = Field(default_factory=DomainSection)
    snapshots: SnapshotSection = Field(default_factory=SnapshotSection)
    operating_point: OperatingPointSection = Field(default_factory=OperatingPointSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainRecipe:
        has_val = has_validation_split = self.data.split.val_size > 0 or self.data.split.kind == "given"
        if not has_val:
            if self.train.monitor != "none":
                raise ValueError("train.monitor: there is no validation split (data.split.val_size=0); set train.monitor=none")
            if self.early_stopping.enabled:
                raise ValueError("early_stopping.enabled: early stopping needs a validation split (data.split.val_size > 0)")
            if self.snapshots.count and self.snapshots.start == "threshold" and self.snapshots.metric != "train_accuracy":
                raise ValueError("snapshots.metric: without a validation split use train_accuracy (Hall et al.'s first setting)")
        if self.early_stopping.enabled and self.snapshots.count and self.snapshots.start == "last":
            raise ValueError("snapshots.start: 'last' needs the final epoch known in advance; disable early_stopping")
        if self.snapshots.count and self.snapshots.start == "last":
            needed = (self.snapshots.count - 1) * self.snapshots.gap_epochs + 1
            if needed > self.train.epochs:
                raise ValueError(
                    f"snapshots.count: {self.snapshots.count} snapshots {self.snapshots.gap_epochs} epochs apart need "
                    f"{needed} epochs, train.epochs is {self.train.epochs}"
                )
        if self.schedule.name == "cyclic":
            base = self.schedule.base_lr or self.optimizer.lr
            if self.schedule.max_lr is not None and self.schedule.max_lr <= base:
                raise ValueError(f"schedule.max_lr: {self.schedule.max_lr} must exceed base_lr ({base})")
        chooses = self.operating_point.rule != "fixed" or self.operating_point.calibrate != "none"
        if chooses and not has_validation_split:
            raise ValueError(
                f"operating_point.rule: '{self.operating_point.rule}' (calibrate '{self.operating_point.calibrate}') is chosen on "
                "the validation split, and there is none (data.split.val_size=0); use rule fixed, calibrate none"
            )
        if self.operating_point.rule != "fixed" and len(TASKS[self.data.task]) > 2:
            raise ValueError(f"operating_point.rule: a {len(TASKS[self.data.task])}-class task decides by the most probable class; use rule fixed")
        if self.data.task == "kermany3" and self.data.negatives_from:
            raise ValueError("data.negatives_from: kermany3 (normal/bacterial/viral) borrows no negatives")
        return self

    # ------------------------------------------------------------------ identity
    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in target order (binary: negative, positive)."""
        return TASKS[self.data.task]

    @property
    def num_outputs(self) -> int:
        """Logits of the network: 1 for a binary task, else the number of classes."""
        return 1 if len(self.classes) == 2 else len(self.classes)

    @property
    def has_validation(self) -> bool:
        return self.data.split.val_size > 0 or self.data.split.kind == "given"

    def resolved(self) -> dict[str, Any]:
        """Every field, defaults filled in, as plain JSON types (what ``config.yaml`` holds)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """``config.yaml``: the resolved recipe; `load_recipe` reads it back to the same recipe."""
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=None)

    def identity(self) -> dict[str, Any]:
        """The fields that define what is learned (hashed by `config_hash`)."""
        data = self.resolved()
        for key in ("name", "engine", "output"):
            data.pop(key, None)
        data["preprocess"].pop("cache_dir", None)
        data["preprocess"].pop("workers", None)
        data["preprocess"].pop("cache", None)
        data["train"].pop("epochs", None)
        data["train"].pop("checkpoint_every_n_steps", None)
        # generalization options left at their defaults are not hashed: runs made before
        # they existed keep their identity (and resume)
        if data["train"].get("single_label_sources") == "keep":
            data["train"].pop("single_label_sources")
        if data["augmentation"].get("acquisition") is None:
            data["augmentation"].pop("acquisition", None)
        if not self.domain.enabled:
            data.pop("domain", None)
        # Fields added after runs existed enter the identity only when set, so the hash
        # of every earlier run (and experiment-grid point) is unchanged.
        if data.get("operating_point") == OperatingPointSection().model_dump(mode="json"):
            data.pop("operating_point")
        if not data["model"].get("allow_random_frozen"):
            data["model"].pop("allow_random_frozen", None)
        return data

    def config_hash(self) -> str:
        """SHA-256 of `identity` as canonical JSON: equal experiments hash equally anywhere."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def run_dir(self) -> Path:
        """``output.run_dir``, else ``output.runs_dir/<name>``."""
        if self.output.run_dir:
            return Path(self.output.run_dir)
        return Path(self.output.runs_dir) / (self.name or "run")

    def with_updates(self, updates: dict[str, Any]) -> TrainRecipe:
        """A validated copy with dotted-key updates (``{"data.split.fold": 3}``)."""
        data = self.resolved()
        for key, value in updates.items():
            set_dotted(data, key, value, origin=f"update '{key}'")
        return recipe_from_mapping(data, origin="recipe")


# ---------------------------------------------------------------------------------- loading


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _format_error(error: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    field = ".".join(loc) or "(recipe)"
    kind, ctx = error["type"], error.get("ctx") or {}
    got = error.get("input")
    messages = {
        "greater_than": lambda: f"must be > {_number(ctx.get('gt'))}",
        "greater_than_equal": lambda: f"must be >= {_number(ctx.get('ge'))}",
        "less_than": lambda: f"must be < {_number(ctx.get('lt'))}",
        "less_than_equal": lambda: f"must be <= {_number(ctx.get('le'))}",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}",
        "extra_forbidden": lambda: "unknown field" + _known_fields_hint(loc),
        "missing": lambda: "is required",
    }
    if kind in messages:
        message = messages[kind]()
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        # Cross-field checks name their field first ("train.monitor: ..."): report it there.
        head, sep, rest = message.partition(": ")
        if sep and " " not in head and "." in head and head.startswith(".".join(loc)):
            field, message = head, rest
    if kind not in ("missing", "extra_forbidden") and not isinstance(got, dict) and repr(got) not in message:
        message += f" (got {got!r})"
    return field, message


def _known_fields_hint(loc: list[str]) -> str:
    model: Any = TrainRecipe
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return ""
    fields = getattr(model, "model_fields", None)
    return f"; known fields here: {', '.join(fields)}" if fields else ""


def recipe_from_mapping(data: dict[str, Any], origin: str = "recipe") -> TrainRecipe:
    """Validate a mapping as a `TrainRecipe`.

    Raises:
        RecipeError: one line per bad field: ``recipe field 'optimizer.lr': must be > 0 (got 0)``.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        return TrainRecipe.model_validate(data)
    except ValidationError as exc:
        fields, lines = [], []
        for error in exc.errors():
            field, message = _format_error(error)
            fields.append(field)
            lines.append(f"recipe field '{field}': {message}")
        prefix = f"{origin}: " if origin != "recipe" else ""
        raise RecipeError(prefix + "\n".join(lines), fields) from None


def set_dotted(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """``data[a][b][c] = deepcopy(value)`` for ``key = "a.b.c"`` (sections made as needed).

    Raises:
        RecipeError: ``key`` is not a dotted name, or walks through a value; ``origin``
            names where the key came from (``--set 'x=1'``, an experiment axis...).
    """
    parts = [p for p in key.split(".")]
    if not all(parts):
        raise RecipeError(f"{origin}: '{key}' is not a dotted field name like optimizer.lr", [key])
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"{origin}: recipe field '{where}' is a value, not a section, so '{key}' cannot be set", [key])
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a recipe mapping (a deep copy is returned).

    The value is parsed as YAML (``3`` -> int, ``1e-3`` -> float, ``null`` -> None,
    ``[a, b]`` -> list, ``{k: 1}`` -> dict); anything else stays text.

    Raises:
        RecipeError: an override without ``=``, or one whose path runs through a value.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. optimizer.lr=1e-3", [item])
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            value = text  # dates and other YAML types stay text
        set_dotted(out, key, value, origin=f"--set {item!r}")
    return out


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make a recipe mapping's relative paths absolute, in place (against ``base``, the current directory).

    The paths: ``data.collection``, ``data.manifest``, ``preprocess.cache_dir``,
    ``preprocess.segmenter_weights``, ``model.pretrained``, ``output.runs_dir`` and
    ``output.run_dir`` (the cache and runs folders are filled with their defaults first).
    `load_recipe` and the experiment grid (`covidcxr.experiments.recipe`) use it.
    """

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            value = section[key]
            if value.lower() in ("none", "null", "random"):
                return
            path = Path(value).expanduser()
            section[key] = str(path if path.is_absolute() else (base / path).resolve())

    # the schema's default locations are relative too: make them absolute like the rest
    if isinstance(data.get("preprocess", {}), dict):
        data.setdefault("preprocess", {}).setdefault("cache_dir", PreprocessSection.model_fields["cache_dir"].default)
    if isinstance(data.get("output", {}), dict):
        data.setdefault("output", {}).setdefault("runs_dir", OutputSection.model_fields["runs_dir"].default)
    fix(data.get("data"), "collection")
    fix(data.get("data"), "manifest")
    fix(data.get("preprocess"), "cache_dir")
    fix(data.get("preprocess"), "segmenter_weights")
    fix(data.get("model"), "pretrained")
    fix(data.get("output"), "runs_dir")
    fix(data.get("output"), "run_dir")


def read_recipe_yaml(path: Path, error: type[RecipeError] = RecipeError) -> Any:
    """The parsed YAML of a recipe file (any shape: callers check it).

    Raises:
        ``error`` (a `RecipeError`): the file cannot be read or is not valid YAML.
    """
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None) -> TrainRecipe:
    """Read, override, resolve and validate a recipe YAML.

    Args:
        path: the recipe file.
        overrides: ``["optimizer.lr=1e-3", "data.split.kind=kfold"]`` (``--set``).
        base_dir: relative paths in the recipe are resolved against it (default: the
            current directory, where the command runs).

    Returns:
        The validated `TrainRecipe`; ``name`` defaults to the file's stem.

    Raises:
        RecipeError: unreadable file, not a mapping, a bad override or a bad field.

    Example:
        >>> recipe = load_recipe("recipes/demo.yaml", ["train.epochs=1"])  # doctest: +SKIP
        >>> recipe.train.epochs  # doctest: +SKIP
        1
    """
    path = Path(path)
    data = read_recipe_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    if "experiment" in data:
        # An experiment recipe (covidcxr.experiments): its fields outside `experiment:` are the
        # base point, which is what a single training run trains; the grid and its scales
        # belong to `covidcxr experiment run`.
        data = {key: value for key, value in data.items() if key != "experiment"}
        for item in overrides:
            if item.split("=", 1)[0].strip() == "scale" or item.startswith(("experiment.", "pretrain.")):
                raise RecipeError(f"{path}: --set {item!r} is an experiment setting; run `covidcxr experiment run {path} --set {item}`", [item])
    data = apply_overrides(data, list(overrides))
    if not data.get("name"):
        data["name"] = path.stem
    resolve_paths(data, Path(base_dir) if base_dir is not None else Path.cwd())
    return recipe_from_mapping(data, origin=str(path))
