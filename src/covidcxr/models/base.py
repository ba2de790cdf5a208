"""The one API every covidcxr network exposes: `CXRClassifier`.

Every model of the zoo is a backbone cut into ``stages`` (bottom to top) followed by a
``head`` that maps the last feature map to logits, in the style of timm:

* ``forward_features(x)``: (B, C, H, W) image -> (B, F, h, w) feature map of the last stage;
* ``forward_head(features)``: (B, F, h, w) -> (B, num_classes) logits (no sigmoid/softmax:
  the training loss takes logits);
* ``forward(x) = forward_head(forward_features(x))``;
* ``embed(x)``: (B, F) global-average-pooled feature map, what the shortcut audit's
  source probe and t-SNE plots consume (independent of the head, so the embedding of a
  Hall head model and a Ben Ahmed head model of the same backbone are comparable).

The backbone always lives in ``self.stages`` (an ``nn.ModuleList``) and the head in
``self.head``; nothing else holds parameters. Freeze policies, "layer cutoff", the
torchvision weight mapping and Grad-CAM all rely on that split: backbone parameters are
exactly those whose name starts with ``stages.``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.errors import CovidCXRError

_STAGE_ITEM_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.(.*)$")

# Modules whose own (non-recursive) parameters make them a "layer" in the parametrised
# sense: convolutions, normalisations and fully connected layers.
PARAMETRISED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class CXRClassifier(nn.Module):
    """Base class of every covidcxr classifier: a staged backbone plus a head.

    Subclasses build ``self.stages`` (an ``nn.ModuleList``, bottom to top), set
    ``self.num_features`` (channels of the last stage's output) and call
    `init_head`. The default `forward_features` runs the stages in sequence; a network
    with connections across stages overrides it.

    Attributes:
        stages: the backbone's stages, bottom (input) to top; ``stages[-1]`` outputs the
            feature map that `forward_features` returns.
        head: the classifier head, (B, F, h, w) -> (B, num_classes).
        num_features: F, the channel count of the feature map and of `embed`.
        num_classes: the number of logits.
        in_channels: the number of input channels (1 for grayscale CXR).
        default_cfg: metadata filled by `covidcxr.models.create_model` (input size,
            paper, head, citation...; see `covidcxr.models.registry.ModelCfg`).
        frozen_bn_eval: when True (set by `covidcxr.models.freeze.apply_freeze_policy`),
            ``model.train()`` leaves every BatchNorm whose affine parameters are frozen
            in eval mode, so its running statistics stay those it was loaded with.

    Example:
        >>> from covidcxr.models import create_model
        >>> model = create_model("resnet18", num_classes=1, in_channels=1)
        >>> x = torch.zeros(2, 1, 224, 224)
        >>> model.forward_features(x).shape
        torch.Size([2, 512, 7, 7])
        >>> model(x).shape, model.embed(x).shape
        (torch.Size([2, 1]), torch.Size([2, 512]))
    """

    stages: nn.ModuleList
    head: nn.Module
    num_features: int

    def __init__(self, num_classes: int = 1, in_channels: int = 1) -> None:
        super().__init__()
        if num_classes < 1:
            raise CovidCXRError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise CovidCXRError(f"in_channels must be >= 1, got {in_channels}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.default_cfg: dict[str, Any] = {}
        self.frozen_bn_eval = False

    # ------------------------------------------------------------------ construction
    def init_stage_weights(self) -> None:
        """torchvision's initialisation of the hand-written backbones.

        Kaiming-normal (fan_out, ReLU gain) convolutions with zero biases; BatchNorm at
        weight 1, bias 0. One place, so every hand-written network starts alike.
        """
        for module in self.stages.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def init_head(self, head: str | nn.Module = "linear", head_kwargs: dict[str, Any] | None = None) -> None:
        """Attach a head by name (see `covidcxr.models.heads.HEADS`) or as a module.

        Args:
            head: a registered head name ("linear", "hall", "benahmed", ...) or an
                ``nn.Module`` mapping (B, num_features, h, w) to (B, num_classes).
            head_kwargs: keyword arguments of the head builder (hidden sizes, dropout...).
        """
        from covidcxr.models.heads import build_head

        if isinstance(head, nn.Module):
            if head_kwargs:
                raise CovidCXRError("head_kwargs only apply to a head given by name, not to a module")
            self.head = head
        else:
            self.head = build_head(head, self.num_features, self.num_classes, **(head_kwargs or {}))

    def reset_head(self, head: str | nn.Module = "linear", num_classes: int | None = None, **head_kwargs: Any) -> None:
        """Replace the head (e.g. a new task on a pretrained backbone); keeps the backbone.

        Args:
            head: head name or module, as in `init_head`.
            num_classes: new number of logits (default: unchanged).
            **head_kwargs: head builder arguments.
        """
        if num_classes is not None:
            self.num_classes = int(num_classes)
        self.init_head(head, head_kwargs or None)
        if self.default_cfg:
            self.default_cfg = {
                **self.default_cfg,
                "head": head if isinstance(head, str) else type(head).__name__,
                "head_kwargs": dict(head_kwargs),
                "num_classes": self.num_classes,
            }

    # ------------------------------------------------------------------ forward API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone: (B, in_channels, H, W) -> (B, num_features, h, w) last-stage feature map."""
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Head: (B, num_features, h, w) feature map -> (B, num_classes) logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) image batch -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, num_features) globally average-pooled features.

        The embedding the audit's source probe and t-SNE use; it is the input of the
        head's first layer for every GAP head.
        """
        return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)

    # ------------------------------------------------------------------ introspection
    @property
    def gradcam_layer(self) -> str:
        """Module name (for ``model.get_submodule`` / MONAI ``GradCAM(target_layers=...)``)
        of the last stage, whose output is the feature map `forward_features` returns."""
        return f"stages.{len(self.stages) - 1}"

    def backbone_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the backbone only (everything under ``stages.``)."""
        for name, param in self.named_parameters():
            if name.startswith("stages."):
                yield name, param

    def head_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the head only (everything under ``head.``)."""
        for name, param in self.named_parameters():
            if name.startswith("head."):
                yield name, param

    def layer_sequence(self, count: str = "default") -> list[tuple[str, nn.Module | None]]:
        """The backbone's "layers" in order, bottom to top, as a layer cutoff counts them.

        Default definition (``count="parametrised"``): every module that owns parameters
        directly (convolution, BatchNorm, linear), in registration order, which is the
        forward order for every network here (inside a residual block the projection
        shortcut comes after the main branch). VGG and MobileNetV2 override the default
        (``count="keras"``) to reproduce the layer list of the Keras application
        Apostolopoulos & Mpesiana 2020 cut (Table 1), where parameter-free layers
        (input, padding, pooling, activation, add) count too; those appear with module
        ``None``.

        Args:
            count: "default" (the model's own definition), "parametrised" or "keras".

        Returns:
            ``[(name, module or None), ...]``; freezing layer ``i`` freezes the direct
            parameters of its module.
        """
        if count in ("default", "parametrised"):
            return [
                (name, module)
                for name, module in self.stages.named_modules(prefix="stages")
                if isinstance(module, PARAMETRISED_TYPES) and any(True for _ in module.parameters(recurse=False))
            ]
        raise CovidCXRError(
            f"{type(self).__name__} has no '{count}' layer list; use count='parametrised' "
            "(a Keras layer list exists only for vgg16, vgg19 and mobilenet_v2)"
        )

    # ------------------------------------------------------------------ train/eval
    def train(self, mode: bool = True) -> CXRClassifier:
        """As ``nn.Module.train``; with ``frozen_bn_eval`` set, frozen BatchNorms stay in eval."""
        super().train(mode)
        if mode and getattr(self, "frozen_bn_eval", False):
            from covidcxr.models.freeze import set_frozen_batchnorm_eval

            set_frozen_batchnorm_eval(self)
        return self

    # ------------------------------------------------------------------ weights
    def torchvision_name(self, key: str) -> str:
        """The torchvision state-dict key of our backbone key ``key`` (``stages.*``).

        Raises:
            CovidCXRError: the network has no torchvision counterpart.
        """
        raise CovidCXRError(
            f"{type(self).__name__} has no torchvision counterpart: torchvision weights cannot be mapped onto it"
        )

    def flat_features_name(self, key: str, index: Mapping[tuple[int, int], int]) -> str:
        """``stages.S.I.rest`` -> ``features.N.rest`` for torchvision nets with one flat ``features``.

        Args:
            key: our backbone key.
            index: ``(stage, item) -> N``, built by the network alongside its stages.
        """
        match = _STAGE_ITEM_KEY.match(key)
        if match is None:
            return CXRClassifier.torchvision_name(self, key)
        return f"features.{index[(int(match.group(1)), int(match.group(2)))]}.{match.group(3)}"

    #: prefixes of torchvision keys that belong to the classifier (never loaded).
    torchvision_head_prefixes: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, in_channels={self.in_channels}, num_features={self.num_features}"
