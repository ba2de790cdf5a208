"""Classifier heads: (B, F, h, w) feature map -> (B, num_classes) logits.

Every head is a `ClassifierHead`: a pooling step (global average pooling, or flattening
for the papers that used Keras' ``Flatten``), an optional MLP, and a final linear layer
``fc`` producing logits. Heads never apply sigmoid/softmax: the papers' "sigmoid output"
is folded into the loss (``BCEWithLogitsLoss``), which is numerically safer.

Registered heads (``build_head(name, in_features, num_classes, **kwargs)``):

==================  =====================================================================
name                layers after pooling (GAP unless ``pool="flatten"``)
==================  =====================================================================
``linear``          [Dropout(p)] -> FC(num_classes)
``hall``            FC64 -> ReLU -> Dropout(0.5) -> FC (Hall et al. 2020, Sec. 3)
``benahmed``        FC64 -> ReLU -> Dropout(0.5) -> BatchNorm1d -> FC (Ben Ahmed et al.
                    2021, Sec. II-C, Table 2)
``apostolopoulos``  FC(h1) -> ReLU [-> Dropout -> FC(h2) -> ReLU] -> FC; VGG19: h=(1024,),
                    MobileNetV2: h=(1000, 750) with dropout (Apostolopoulos & Mpesiana
                    2020, Table 1)
``tartaglione``     FC(h) -> ReLU -> FC; ResNet-18: h=256, ResNet-50: h=512 (Tartaglione
                    et al. 2020, their released code ``models/covid_classifier.py``)
``covidnet``        FC1024 -> ReLU -> FC256 -> ReLU -> FC (Wang & Wong 2020, Fig. 2)
==================  =====================================================================

Example:
    >>> head = build_head("benahmed", in_features=2048, num_classes=1)
    >>> head(torch.zeros(2, 2048, 7, 7)).shape
    torch.Size([2, 1])
    >>> sum(p.numel() for p in head.parameters())
    131329
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from covidcxr.errors import CovidCXRError

__all__ = ["HEADS", "ClassifierHead", "build_head", "list_heads", "register_head"]


class ClassifierHead(nn.Module):
    """Pool -> (optional) MLP -> linear logits.

    Args:
        in_features: F, channels of the incoming feature map.
        num_classes: number of logits.
        mlp: hidden layers (applied to the pooled (B, F) or flattened (B, F*h*w) vector);
            an empty ``nn.Sequential`` for a linear head.
        mlp_out: width of ``mlp``'s output (the input of ``fc``).
        pool: "avg" (global average pooling; any input size) or "flatten" (Keras-style
            ``Flatten``; needs ``feature_hw`` and a fixed input size).
        feature_hw: (h, w) of the feature map, required by ``pool="flatten"``.

    Shapes:
        input (B, F, h, w) -> output (B, num_classes).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        mlp: nn.Sequential,
        mlp_out: int,
        pool: str = "avg",
        feature_hw: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise CovidCXRError(f"head pool must be 'avg' or 'flatten', got {pool!r}")
        if pool == "flatten" and (feature_hw is None or len(feature_hw) != 2):
            raise CovidCXRError("pool='flatten' needs feature_hw=(h, w), the size of the last feature map")
        self.in_features = in_features
        self.pool_type = pool
        self.feature_hw = tuple(int(v) for v in feature_hw) if feature_hw is not None else None
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.Identity()
        self.flatten = nn.Flatten(1)
        self.mlp = mlp
        self.fc = nn.Linear(mlp_out, num_classes)
        # Hidden layers keep PyTorch's default (Kaiming-uniform) init; the logit layer gets
        # a small normal init and zero bias (as torchvision's classifiers), so the initial
        # logits are near 0, i.e. probability 0.5 per class.
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def pooled_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) -> (B, F) after GAP, or (B, F*h*w) after flattening."""
        if self.pool_type == "flatten" and tuple(features.shape[-2:]) != self.feature_hw:
            raise CovidCXRError(
                f"this head flattens a {self.feature_hw} feature map but got {tuple(features.shape[-2:])}: "
                "the input size differs from the one the head was built for"
            )
        return self.flatten(self.pool(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mlp(self.pooled_features(features)))


def _pooled_width(in_features: int, pool: str, feature_hw: Sequence[int] | None) -> int:
    if pool == "flatten" and feature_hw is not None:
        return in_features * int(feature_hw[0]) * int(feature_hw[1])
    return in_features


def _mlp(width: int, hidden: Sequence[int], dropout_after: Sequence[float], bn_after: Sequence[bool]) -> nn.Sequential:
    """FC -> ReLU [-> Dropout] [-> BatchNorm1d] per hidden layer."""
    layers: list[nn.Module] = []
    for size, p, bn in zip(hidden, dropout_after, bn_after, strict=True):
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        if p > 0:
            layers.append(nn.Dropout(p))
        if bn:
            layers.append(nn.BatchNorm1d(size))
        width = size
    return nn.Sequential(*layers)


HeadBuilder = Callable[..., ClassifierHead]
HEADS: dict[str, HeadBuilder] = {}


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register a head builder ``fn(in_features, num_classes, **kwargs) -> nn.Module``."""

    def decorator(fn: HeadBuilder) -> HeadBuilder:
        if name in HEADS:
            raise CovidCXRError(f"head '{name}' is already registered")
        HEADS[name] = fn
        return fn

    return decorator


def list_heads() -> list[str]:
    """Names of the registered heads."""
    return sorted(HEADS)


def build_head(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered head.

    Args:
        name: one of `list_heads()`.
        in_features: channels F of the backbone's feature map.
        num_classes: number of logits.
        **kwargs: the builder's arguments (``hidden``, ``dropout``, ``pool``, ``feature_hw``).

    Raises:
        CovidCXRError: unknown head name (the message lists the known ones), or bad arguments.
    """
    if name not in HEADS:
        raise CovidCXRError(f"unknown head '{name}'; known heads: {', '.join(list_heads())}")
    try:
        return HEADS[name](in_features, num_classes, **kwargs)
    except TypeError as exc:  # an unexpected keyword: say which head refused it
        raise CovidCXRError(f"head '{name}': {exc}") from exc


@register_head("linear")
def linear_head(
    in_features: int,
    num_classes: int,
    dropout: float = 0.0,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> [Dropout(p)] -> FC(num_classes): the plain classifier of ResNet/DenseNet."""
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = nn.Sequential(nn.Dropout(dropout)) if dropout > 0 else nn.Sequential()
    return ClassifierHead(in_features, num_classes, mlp, width, pool, feature_hw)


@register_head("hall")
def hall_head(
    in_features: int,
    num_classes: int,
    hidden: int = 64,
    dropout: float = 0.5,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> FC64 -> ReLU -> Dropout -> FC (Hall et al. 2020, Sec. 3).

    The paper: "global average pooling, followed by a fully connected layer of 64 units
    with dropout and finally a classification layer with sigmoid output". It gives no
    dropout rate; 0.5 is the usual Keras choice and the one Ben Ahmed et al. (same
    group) state for the same head.
    """
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = _mlp(width, [hidden], [dropout], [False])
    return ClassifierHead(in_features, num_classes, mlp, hidden, pool, feature_hw)


@register_head("benahmed")
def benahmed_head(
    in_features: int,
    num_classes: int,
    hidden: int = 64,
    dropout: float = 0.5,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> FC64 -> ReLU -> Dropout(0.5) -> BatchNorm1d -> FC (Ben Ahmed et al. 2021, Table 2).

    On ResNet-50 (F = 2048) with one output this head has 131,329 parameters; with the
    backbone's 53,120 BatchNorm affine parameters that is the paper's "184K trainable".
    """
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = _mlp(width, [hidden], [dropout], [True])
    return ClassifierHead(in_features, num_classes, mlp, hidden, pool, feature_hw)


@register_head("apostolopoulos")
def apostolopoulos_head(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (1024,),
    dropout: float | None = None,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> FC(h1) -> ReLU [-> Dropout -> FC(h2) -> ReLU ...] -> FC (Apostolopoulos & Mpesiana 2020).

    Table 1 gives the "Neural Network" on top of each cut CNN: VGG19 1024 nodes,
    MobileNetV2 1000 then 750 nodes; Sec. "Transfer learning": "For the Neural Networks
    utilizing two hidden layers, a Dropout layer is added". The rate and its place are
    not stated: by default 0.5 between consecutive hidden layers when there are two or
    more, none with one. The paper does not say GAP or Flatten either; GAP (default)
    keeps the head independent of the input size, ``pool="flatten"`` reproduces a Keras
    ``Flatten`` (VGG19 at 224 px: 25088 -> 1024, 25.7 M parameters).
    """
    hidden = [int(h) for h in ([hidden] if isinstance(hidden, int) else hidden)]
    if not hidden:
        raise CovidCXRError("apostolopoulos head needs at least one hidden layer")
    if dropout is None:
        dropout = 0.5 if len(hidden) >= 2 else 0.0
    drops = [dropout if i < len(hidden) - 1 else 0.0 for i in range(len(hidden))]
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = _mlp(width, hidden, drops, [False] * len(hidden))
    return ClassifierHead(in_features, num_classes, mlp, hidden[-1], pool, feature_hw)


@register_head("tartaglione")
def tartaglione_head(
    in_features: int,
    num_classes: int,
    hidden: int = 256,
    dropout: float = 0.0,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> FC(hidden) -> ReLU -> FC, the COVID classifier of Tartaglione et al. 2020.

    The paper does not describe it; their released code (``CovidClassifier``) uses
    Linear(512, 256) -> ReLU -> Linear(256, 1) on ResNet-18 and 2048 -> 512 -> 1 on
    ResNet-50, on the encoder's average-pooled output.
    """
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = _mlp(width, [hidden], [dropout], [False])
    return ClassifierHead(in_features, num_classes, mlp, hidden, pool, feature_hw)


@register_head("covidnet")
def covidnet_head(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (1024, 256),
    dropout: float = 0.0,
    pool: str = "avg",
    feature_hw: Sequence[int] | None = None,
) -> ClassifierHead:
    """GAP -> FC1024 -> ReLU -> FC256 -> ReLU -> FC, after COVID-Net (Wang & Wong 2020, Fig. 2).

    COVID-Net flattens its last feature map; GAP (default) makes the head independent
    of the input size and 49x smaller at 224 px; ``pool="flatten"`` restores the original.
    """
    hidden = [int(h) for h in hidden]
    width = _pooled_width(in_features, pool, feature_hw)
    mlp = _mlp(width, hidden, [dropout] * len(hidden), [False] * len(hidden))
    return ClassifierHead(in_features, num_classes, mlp, hidden[-1] if hidden else width, pool, feature_hw)
