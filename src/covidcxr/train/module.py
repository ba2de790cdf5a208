"""The LightningModule that trains a `covidcxr.models` classifier, and model building from a recipe.

`CXRClassifierModule` wraps one `CXRClassifier`:

* loss: ``BCEWithLogitsLoss`` on one logit (binary tasks; ``pos_weight`` with class
  weights) or ``CrossEntropyLoss`` (multi-class; ``weight``), always computed in fp32
  on the logits, also under bf16/fp16 autocast;
* inputs: the cache's float16 [0, 1] images are converted on the device, rigidly
  augmented (training only: rotation, translation, horizontal flip, one affine warp per
  image, seeded by (seed, epoch, batch, rank) so a resumed run draws the same
  augmentations), acquisition-randomized when the recipe asks (`covidcxr.train.augment`,
  same seeding), normalised (``model.normalize_mean/std``) and put in ``channels_last``
  memory format when the recipe asks (with bf16 autocast, oneDNN's fastest path on CPUs
  with AVX-512/AMX);
* across sources (recipe ``domain:``, `covidcxr.train.domain`): a gradient-reversal
  source head on the pooled features (Ganin et al. 2016) adds its source cross-entropy,
  GroupDRO (Sagawa et al. 2020) replaces the mean loss by the worst-source-weighted one;
  the source of each training image comes from the records (``rows`` of the batch);
* validation: loss, ROC AUC (sklearn), accuracy and balanced accuracy each epoch,
  logged as ``val_loss``/``val_auc``/``val_accuracy``/``val_balanced_accuracy``;
* optimisers Adam/AdamW/SGD/RMSprop over the trainable parameters only (freeze policies
  set ``requires_grad``; a frozen BatchNorm stays in eval mode via the model's
  ``frozen_bn_eval``), schedules cyclic (per step) and cosine (per epoch);
* checkpoints: ``checkpoint["covidcxr"]`` holds the provenance (config hash, manifest
  hash, split ids, code version, classes); every saved value is a primitive or a
  tensor, so ``torch.load(path, weights_only=True)`` reads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models import CXRClassifier, apply_freeze_policy, create_model
from covidcxr.train.metrics import classification_metrics
from covidcxr.train.recipe import TrainRecipe, recipe_from_mapping

__all__ = ["CXRClassifierModule", "build_model", "load_checkpoint_model", "protect_degenerate_convs", "rigid_augment", "rigid_warp"]


def build_model(recipe: TrainRecipe) -> CXRClassifier:
    """The recipe's network with its freeze policy applied (weights: random init).

    The freeze policy ``default`` is the model's paper recipe (``default_cfg``).
    """
    spec = recipe.model
    try:
        model = create_model(
            spec.name,
            num_classes=recipe.num_outputs,
            in_channels=spec.in_channels,
            head=spec.head,
            head_kwargs=spec.head_kwargs or None,
            **spec.arch_kwargs,
        )
    except TypeError as exc:
        raise CovidCXRError(f"model.arch_kwargs / model.head_kwargs {spec.arch_kwargs} / {spec.head_kwargs} do not fit {spec.name}: {exc}") from None
    policy = model.default_cfg.get("freeze_policy", "none") if spec.freeze == "default" else spec.freeze
    apply_freeze_policy(model, policy)
    return model


class _FP32Conv2d(nn.Conv2d):
    """A ``Conv2d`` that always runs in fp32, also under autocast (see `protect_degenerate_convs`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def protect_degenerate_convs(model: nn.Module, in_channels: int, size: tuple[int, int]) -> list[str]:
    """Run in fp32 every strided convolution whose input is 1 pixel high or wide.

    oneDNN's bf16 weight gradient of a strided 3x3 convolution on a 1x1 input reads
    uninitialised memory (torch 2.13 CPU: NaN/inf in about half the calls), which happens
    to Conv8's last layer below 128 px. Such a layer is tiny, so fp32 costs nothing; its
    class becomes `_FP32Conv2d` (state-dict keys unchanged, picklable).

    Returns:
        The names of the protected layers.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1:
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(i[0].shape))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, *size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    protected = []
    for name, shape in shapes.items():
        if min(shape[-2:]) <= 1:
            model.get_submodule(name).__class__ = _FP32Conv2d
            protected.append(name)
    return protected


def rigid_warp(x: torch.Tensor, degrees: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Rotate, shift and (optionally) flip every image of a batch: a rigid warp, never a scaling.

    Args:
        x: (B, C, H, W) float images in [0, 1] (padding is 0, black, as the cache's).
        degrees: (B,) rotation about the centre, in degrees (counter-clockwise on screen).
        shift: (B, 2) shift as a fraction of (width, height).
        flip: (B,) bool, horizontal flip (applied first).

    Returns:
        The warped batch, bilinear. The rotation is made in pixel units, so angles and
        lengths are kept also for non-square images.
    """
    b, _, h, w = x.shape
    angle = torch.deg2rad(degrees.float().to(x.device))
    sign = torch.where(flip.to(x.device), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    # normalised coordinates: a pixel-space rotation R becomes D^-1 R D with D = diag(w, h)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h) * sign
    theta[:, 1, 1] = cos
    theta[:, :, 2] = -2 * shift.float().to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rigid_augment(
    x: torch.Tensor,
    degrees: float,
    translation: float,
    hflip: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random rigid warp of every image of a batch (`rigid_warp` with random parameters).

    Args:
        x: (B, C, H, W) float images in [0, 1].
        degrees: rotation uniform in ±degrees.
        translation: shift uniform in ± this fraction of the width/height.
        hflip: probability of a horizontal flip.
        generator: a generator on ``x``'s device (reproducible draws).
    """
    u = torch.rand(x.shape[0], 4, generator=generator, device=x.device, dtype=torch.float32)
    return rigid_warp(x, (u[:, 0] * 2 - 1) * degrees, (u[:, 1:3] * 2 - 1) * translation, u[:, 3] < hflip)


class CXRClassifierModule(L.LightningModule):
    """Train/validate/predict one classifier from a resolved recipe.

    Args:
        recipe: the resolved recipe (``TrainRecipe.resolved()``; saved as hyperparameters,
            so ``load_from_checkpoint`` rebuilds the same network).
        provenance: primitives stored under ``checkpoint["covidcxr"]`` (the run sets
            config hash, split ids, code version; ``setup`` adds the manifest hash).
    """

    def __init__(self, recipe: dict[str, Any], provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"recipe": recipe})
        self.recipe: TrainRecipe = recipe_from_mapping(recipe)
        self.model = build_model(self.recipe)
        self.protected_layers = protect_degenerate_convs(self.model, self.recipe.model.in_channels, tuple(self.recipe.preprocess.size))
        self.classes = list(self.recipe.classes)
        self.binary = self.recipe.num_outputs == 1
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.class_weights: list[float] | None = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_loss: list[Any] = [0.0, 0]
        self._train_sums: torch.Tensor | None = None  # loss sum, correct, count (on the device)
        self.last_val_metrics: dict[str, Any] = {}
        self.acquisition = None
        if self.recipe.augmentation.acquisition is not None:
            from covidcxr.train.augment import AcquisitionRandomizer

            self.acquisition = AcquisitionRandomizer(self.recipe.augmentation.acquisition)
        self.adversary: nn.Module | None = None
        self.group_dro: nn.Module | None = None
        self.train_sources: list[str] = []
        self._train_groups: torch.Tensor | None = None
        if self.recipe.engine.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and getattr(datamodule, "prepared", None) is not None:
            from covidcxr.train.data import manifest_hash, split_ids

            counts = datamodule.class_counts
            if self.recipe.train.balancing == "class_weights":
                total, k = float(sum(counts)), len(counts)
                if self.binary:
                    self.class_weights = [counts[0] / max(counts[1], 1)]
                else:
                    self.class_weights = [total / (k * max(c, 1)) for c in counts]
            records = datamodule.prepared.records
            if self.recipe.domain.enabled:
                self._setup_domain(records, datamodule.datasets["train"].rows)
            self.provenance.update(
                manifest_hash=manifest_hash(records),
                split_ids=split_ids(records),
                class_counts_train=[int(c) for c in counts],
                n_images={s: int((records["split"] == s).sum()) for s in ("train", "val", "test")},
            )

    def _setup_domain(self, records: Any, train_rows: Any) -> None:
        """The source id of every training image, and the adversary / GroupDRO modules sized by the sources."""
        from covidcxr.train.domain import GroupDRO, SourceAdversary

        sources = records["source"].astype(str).to_numpy()[np.asarray(train_rows)]
        self.train_sources = sorted(set(sources.tolist()))
        index = {name: i for i, name in enumerate(self.train_sources)}
        self._train_groups = torch.as_tensor([index[v] for v in sources], dtype=torch.long)
        self.provenance["train_sources"] = list(self.train_sources)
        spec = self.recipe.domain
        if spec.adversarial is not None and self.adversary is None:
            if len(self.train_sources) < 2:
                raise CovidCXRError(f"domain.adversarial: the training split has one source ({self.train_sources}); a source head needs two or more")
            self.adversary = SourceAdversary(self.model.num_features, len(self.train_sources), spec.adversarial.hidden)
        if spec.group_dro is not None and self.group_dro is None:
            self.group_dro = GroupDRO(len(self.train_sources), spec.group_dro.eta)

    def adversary_lambda(self) -> float:
        """The gradient-reversal coefficient now (`covidcxr.train.domain.ganin_lambda` of the training progress)."""
        from covidcxr.train.domain import ganin_lambda

        spec = self.recipe.domain.adversarial
        if spec is None:
            return 0.0
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        return ganin_lambda(self.global_step / total, spec.weight, spec.gamma, spec.schedule)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _inputs(self, x: torch.Tensor, augment: bool, batch_idx: int = 0) -> torch.Tensor:
        x = x.float()
        aug = self.recipe.augmentation
        if augment and aug.enabled:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            seed = (self.recipe.seed * 1_000_003 + self.current_epoch * 100_003 + batch_idx) * 257 + rank
            generator = torch.Generator(device=x.device).manual_seed(seed % (2**63 - 1))
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = rigid_augment(x, aug.rotation_degrees, aug.translation, aug.hflip, generator)
        if augment and self.acquisition is not None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            x = self.acquisition(x, seed=(self.recipe.seed * 1_000_003 + self.current_epoch * 100_003 + batch_idx) * 263 + rank)
        x = (x - self.recipe.model.normalize_mean) / self.recipe.model.normalize_std
        if self.recipe.engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = logits.float()
        weights = None
        if self.class_weights is not None:
            weights = torch.tensor(self.class_weights, device=logits.device, dtype=torch.float32)
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits[:, 0], targets.float(), pos_weight=weights, reduction=reduction)
        return F.cross_entropy(logits, targets, weight=weights, reduction=reduction)

    def _domain_loss(self, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, loss)`` with the source head's and/or GroupDRO's terms (recipe ``domain:``)."""
        features = self.model.forward_features(x)
        logits = self.model.forward_head(features)
        assert self._train_groups is not None
        groups = self._train_groups.to(rows.device)[rows.long()]
        if self.group_dro is not None:
            loss = self.group_dro(self._loss(logits, targets, reduction="none"), groups)
        else:
            loss = self._loss(logits, targets)
        if self.adversary is not None:
            pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
            source_logits = self.adversary(pooled, self.adversary_lambda())
            source_loss = F.cross_entropy(source_logits.float(), groups)
            self.log("train_source_loss", source_loss.detach(), on_step=True, on_epoch=False, batch_size=int(targets.shape[0]))
            loss = loss + source_loss
        return logits, loss

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits[:, 0]) if self.binary else torch.softmax(logits, dim=1)

    def _predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        return (probabilities >= 0.5).long() if self.binary else probabilities.argmax(dim=1)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        self._train_sums = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets, rows = batch
        x = self._inputs(images, augment=True, batch_idx=batch_idx)
        if self._train_groups is not None:
            logits, loss = self._domain_loss(x, targets, rows)
        else:
            logits = self.model(x)
            loss = self._loss(logits, targets)
        n = int(targets.shape[0])
        with torch.no_grad():
            # accumulated on the device: no host synchronisation per step
            predicted = self._predicted(self._probabilities(logits.detach()))
            sums = torch.stack([loss.detach().float() * n, (predicted == targets).sum().float(), torch.tensor(float(n), device=loss.device)])
            self._train_sums = sums if self._train_sums is None else self._train_sums.to(sums.device) + sums
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        return loss

    def epoch_train_stats(self) -> dict[str, float | None]:
        """Mean training loss and accuracy of the current epoch so far (this process).

        Raises:
            CovidCXRError: the loss is not finite (diverged training).
        """
        if self._train_sums is None:
            return {"train_loss": None, "train_accuracy": None}
        loss_sum, correct, n = (float(v) for v in self._train_sums.cpu())
        if not math.isfinite(loss_sum):
            raise CovidCXRError(
                f"training diverged: non-finite loss in epoch {self.current_epoch}; lower optimizer.lr "
                "or try engine.precision=32"
            )
        return {"train_loss": loss_sum / n, "train_accuracy": correct / n}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = []
        self._val_loss = [0.0, 0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets, _ = batch
        logits = self.model(self._inputs(images, augment=False))
        loss = self._loss(logits, targets)
        n = int(targets.shape[0])
        self._val_loss[0] = self._val_loss[0] + loss.detach().float() * n
        self._val_loss[1] += n
        self._val.append((self._probabilities(logits).detach().cpu(), targets.detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val:
            self._val = []
            return
        probabilities = torch.cat([p for p, _ in self._val]).numpy()
        targets = torch.cat([t for _, t in self._val]).numpy()
        if not np.isfinite(probabilities).all():
            raise CovidCXRError(
                f"training diverged: non-finite validation outputs after epoch {self.current_epoch}; lower "
                "optimizer.lr or try engine.precision=32"
            )
        metrics = classification_metrics(probabilities, targets, num_classes=len(self.classes))
        loss = float(self._val_loss[0]) / max(self._val_loss[1], 1)
        auc = metrics["auc"] if metrics["auc"] is not None else float("nan")
        values = {
            "val_loss": loss,
            "val_auc": auc,
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
        }
        self.last_val_metrics = dict(values)
        # Every process validated the whole split (no distributed sampler): no reduction needed.
        self.log_dict({k: float(v) for k, v in values.items()}, prog_bar=True, sync_dist=False)
        self._val = []

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, _, rows = batch
        logits = self.model(self._inputs(images, augment=False))
        return {"probabilities": self._probabilities(logits).detach().cpu(), "logits": logits.detach().float().cpu(), "rows": rows.detach().cpu()}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        spec, schedule = self.recipe.optimizer, self.recipe.schedule
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise CovidCXRError("model.freeze: the policy leaves no trainable parameter")
        if self.adversary is not None:
            params += list(self.adversary.parameters())
        lr = schedule.base_lr if schedule.name == "cyclic" and schedule.base_lr else spec.lr
        if spec.name == "adam":
            optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
        elif spec.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
        elif spec.name == "sgd":
            momentum = 0.9 if spec.momentum is None else spec.momentum
            optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov and momentum > 0)
        else:  # rmsprop: Keras' defaults (rho 0.9, no momentum) as Hall et al. used
            momentum = 0.0 if spec.momentum is None else spec.momentum
            optimizer = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, momentum=momentum, weight_decay=spec.weight_decay)
        if schedule.name == "none":
            return optimizer
        if schedule.name == "cyclic":
            max_epochs = max(int(self.trainer.max_epochs or 1), 1)
            steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches // max_epochs))
            scheduler = torch.optim.lr_scheduler.CyclicLR(
                optimizer,
                base_lr=lr,
                max_lr=float(schedule.max_lr or lr),
                step_size_up=max(1, round(schedule.step_size_epochs * steps_per_epoch)),
                mode=schedule.mode,
                gamma=schedule.gamma,
                cycle_momentum=False,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        t_max = schedule.t_max_epochs or self.recipe.train.epochs
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=schedule.eta_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["covidcxr"] = _primitive(
            {**self.provenance, "classes": self.classes, "task": self.recipe.data.task, "model": self.recipe.model.name}
        )
        # the running epoch's loss/accuracy sums, so a run resumed mid-epoch logs the whole epoch
        sums = self._train_sums
        checkpoint["covidcxr_epoch_sums"] = None if sums is None else [float(v) for v in sums.detach().cpu()]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("covidcxr") or {}
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if not fitting:
            return
        sums = checkpoint.get("covidcxr_epoch_sums")
        self._train_sums = None if sums is None else torch.tensor(sums, dtype=torch.float32)
        for key, what in (("config_hash", "the recipe"), ("manifest_hash", "the training data (records, splits or targets)")):
            mine, theirs = self.provenance.get(key), saved.get(key)
            if mine and theirs and mine != theirs:
                raise CovidCXRError(
                    f"cannot resume: {what} changed since the checkpoint was written ({key} {theirs[:12]} in the "
                    f"checkpoint, {mine[:12]} now); re-run with --force-new to start a new run"
                )


def _primitive(value: Any) -> Any:
    """Plain JSON-like types only (so ``weights_only=True`` loading works)."""
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_primitive(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def load_checkpoint_model(checkpoint_path: str | Path) -> tuple[CXRClassifier, dict[str, Any]]:
    """Rebuild the network of one of our training checkpoints, in eval mode, on the CPU.

    Returns:
        ``(model, info)``: ``info`` has ``recipe`` (the resolved recipe dict), ``classes``,
        ``task`` and the provenance (``config_hash``, ``manifest_hash``, ``split_ids``...).

    Raises:
        CovidCXRError: the file is not one of our training checkpoints.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CovidCXRError(f"checkpoint {path} does not exist")
    from covidcxr.io.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    recipe = (checkpoint.get("hyper_parameters") or {}).get("recipe")
    if not isinstance(recipe, dict) or "state_dict" not in checkpoint:
        raise CovidCXRError(f"{path} is not a covidcxr training checkpoint (no recipe in its hyper_parameters)")
    model = build_model(recipe_from_mapping(recipe))
    # float() : a shipped model's weights are stored as float16 (covidcxr.zoo.package); compute is float32
    state = {k[len("model.") :]: (v.float() if v.is_floating_point() else v) for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    info = dict(checkpoint.get("covidcxr") or {})
    info["recipe"] = recipe
    return model, info
