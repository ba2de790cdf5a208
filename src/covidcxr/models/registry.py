"""Model registry: `register_model`, `create_model`, `list_models`, and model metadata.

Each network file registers a factory with its metadata (`ModelCfg`, exposed on every
model as the timm/torchxrayvision-style ``model.default_cfg`` dict): the input size, the
papers that use it and, per paper, the "recipe" (head, head arguments, freeze policy),
the citation, and which torchvision architecture its weights map from.

A name may carry a paper tag, timm style: ``create_model("resnet50.hall2020")`` builds
ResNet-50 with Hall et al.'s head; ``create_model("resnet50")`` uses the model's default
recipe. The recipe's freeze policy is recorded in ``default_cfg["freeze_policy"]``, not
applied: call `covidcxr.models.freeze.apply_freeze_policy` (the training stage does).

Example:
    >>> from covidcxr.models import create_model, list_models
    >>> list_models()[:3]
    ['conv8', 'covidnet', 'densenet121']
    >>> model = create_model("vgg19", num_classes=3, head="apostolopoulos")
    >>> model.default_cfg["head_kwargs"]
    {'hidden': (1024,)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier

__all__ = [
    "PAPERS",
    "ModelCfg",
    "Recipe",
    "create_model",
    "get_model_cfg",
    "list_models",
    "register_model",
]

#: Full references of the papers the zoo reproduces, by the key used in recipes.
PAPERS: dict[str, str] = {
    "tartaglione2020": (
        "Tartaglione E, Barbano CA, Berzovini C, Calandri M, Grangetto M. Unveiling COVID-19 from "
        "chest X-ray with deep learning: a hurdles race with small data. Int J Environ Res Public "
        "Health 2020;17(18):6933."
    ),
    "hall2020": (
        "Hall LO, Paul R, Goldgof DB, Goldgof GM. Finding COVID-19 from chest X-rays using deep "
        "learning on a small dataset. arXiv:2004.02060, 2020."
    ),
    "benahmed2021": (
        "Ben Ahmed K, Goldgof GM, Paul R, Goldgof DB, Hall LO. Discovery of a generalization gap of "
        "convolutional neural networks on COVID-19 X-rays classification. IEEE Access 2021;9."
    ),
    "apostolopoulos2020": (
        "Apostolopoulos ID, Mpesiana TA. Covid-19: automatic detection from X-ray images utilizing "
        "transfer learning with convolutional neural networks. Phys Eng Sci Med 2020;43:635-640."
    ),
    "wang2020": (
        "Wang L, Lin ZQ, Wong A. COVID-Net: a tailored deep convolutional neural network design for "
        "detection of COVID-19 cases from chest X-ray images. Sci Rep 2020;10:19549 (arXiv:2003.09871)."
    ),
    "he2016": "He K, Zhang X, Ren S, Sun J. Deep residual learning for image recognition. CVPR 2016.",
    "huang2017": "Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely connected convolutional networks. CVPR 2017.",
    "simonyan2015": (
        "Simonyan K, Zisserman A. Very deep convolutional networks for large-scale image recognition. ICLR 2015."
    ),
    "sandler2018": (
        "Sandler M, Howard A, Zhu M, Zhmoginov A, Chen LC. MobileNetV2: inverted residuals and linear "
        "bottlenecks. CVPR 2018."
    ),
    "springenberg2015": (
        "Springenberg JT, Dosovitskiy A, Brox T, Riedmiller M. Striving for simplicity: the all "
        "convolutional net. ICLR workshop 2015."
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How one paper used a network.

    Attributes:
        head: head name (see `covidcxr.models.heads.HEADS`).
        head_kwargs: the head's arguments in that paper (hidden sizes, dropout).
        freeze_policy: the policy `apply_freeze_policy` should apply for that paper's
            fine-tuning (``"none"``, ``"backbone"``, ``"all_but_batchnorm"``, a dict...).
        notes: what the paper says, and what we had to choose.
    """

    head: str
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)
    freeze_policy: str | Mapping[str, Any] = "none"
    notes: str = ""


@dataclass(frozen=True)
class ModelCfg:
    """Metadata of a registered network (``model.default_cfg`` is its dict form plus the build).

    Attributes:
        architecture: one line: what the network is and where it comes from.
        input_size: (C, H, W) the recipes train at; C follows ``in_channels`` on build.
        recipes: paper key (see `PAPERS`) -> `Recipe`.
        default_recipe: the recipe used when the name carries no tag.
        references: paper keys of the architecture itself (e.g. "he2016").
        torchvision_arch: torchvision architecture whose state dict
            `covidcxr.models.weights.load_torchvision_state_dict` maps, or None.
        layer_definition: what one "layer" is for ``{"layer_cutoff": n}``.
        notes: deviations from the original and other things a user must know.
    """

    architecture: str
    input_size: tuple[int, int, int] = (1, 224, 224)
    recipes: Mapping[str, Recipe] = field(default_factory=dict)
    default_recipe: str | None = None
    references: tuple[str, ...] = ()
    torchvision_arch: str | None = None
    layer_definition: str = (
        "every module that owns parameters (convolution, BatchNorm, linear), in forward order"
    )
    notes: str = ""


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., CXRClassifier]
    cfg: ModelCfg


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, cfg: ModelCfg | None = None) -> Callable[[Callable[..., CXRClassifier]], Callable[..., CXRClassifier]]:
    """Register a model factory under ``name`` with its metadata.

    The factory must accept ``num_classes``, ``in_channels``, ``head`` and
    ``head_kwargs`` and return a `CXRClassifier`.

    Args:
        name: registry name (lower case, no dots: a dot separates the paper tag).
        cfg: the model's `ModelCfg`.

    Example:
        >>> @register_model("tiny", ModelCfg(architecture="a tiny test net"))
        ... def tiny(num_classes=1, in_channels=1, head="linear", head_kwargs=None):
        ...     ...
    """
    if "." in name:
        raise CovidCXRError(f"model name '{name}' must not contain '.', which separates the paper tag")

    def decorator(factory: Callable[..., CXRClassifier]) -> Callable[..., CXRClassifier]:
        if name in _REGISTRY:
            raise CovidCXRError(f"model '{name}' is already registered")
        model_cfg = cfg or ModelCfg(architecture=name)
        if model_cfg.default_recipe is not None and model_cfg.default_recipe not in model_cfg.recipes:
            raise CovidCXRError(f"model '{name}': default recipe '{model_cfg.default_recipe}' is not among its recipes")
        _REGISTRY[name] = _Entry(name, factory, model_cfg)
        return factory

    return decorator


def list_models(paper: str | None = None) -> list[str]:
    """Registered model names (sorted); with ``paper``, only those that paper used.

    Args:
        paper: a key of `PAPERS` (e.g. "hall2020") to filter by.
    """
    return sorted(name for name, entry in _REGISTRY.items() if paper is None or paper in entry.cfg.recipes)


def _lookup(name: str) -> tuple[_Entry, str | None]:
    arch, _, tag = name.partition(".")
    if arch not in _REGISTRY:
        raise CovidCXRError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    entry = _REGISTRY[arch]
    if tag and tag not in entry.cfg.recipes:
        known = ", ".join(f"{arch}.{key}" for key in entry.cfg.recipes) or "none"
        raise CovidCXRError(f"model '{arch}' has no recipe '{tag}'; its recipes: {known}")
    return entry, (tag or entry.cfg.default_recipe)


def get_model_cfg(name: str) -> dict[str, Any]:
    """The metadata of a registered model as a dict, without building it.

    Raises:
        CovidCXRError: unknown name (the message lists the known names).
    """
    entry, recipe_key = _lookup(name)
    return _cfg_dict(entry, recipe_key)


def _cfg_dict(entry: _Entry, recipe_key: str | None) -> dict[str, Any]:
    cfg = entry.cfg
    out = asdict(cfg)
    out["recipes"] = {key: asdict(recipe) for key, recipe in cfg.recipes.items()}
    out["name"] = entry.name
    out["recipe"] = recipe_key
    out["paper"] = recipe_key
    out["citation"] = PAPERS.get(recipe_key, "") if recipe_key else ""
    out["references"] = {key: PAPERS[key] for key in cfg.references if key in PAPERS}
    recipe = cfg.recipes.get(recipe_key) if recipe_key else None
    out["freeze_policy"] = recipe.freeze_policy if recipe else "none"
    return out


def create_model(
    name: str,
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "default",
    pretrained: str | Path | Mapping[str, torch.Tensor] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> CXRClassifier:
    """Build a registered network with the common `CXRClassifier` API.

    Args:
        name: a registered name (`list_models()`), optionally with a paper tag
            (``"resnet50.hall2020"``) selecting that paper's head.
        num_classes: number of logits (1 for a binary sigmoid classifier).
        in_channels: image channels (1 for grayscale CXR; 3 to feed replicated RGB).
        head: "default" (the recipe's head), a head name ("linear", "hall",
            "benahmed", "apostolopoulos", "tartaglione", "covidnet") or an ``nn.Module``.
            A head named without ``head_kwargs`` takes this model's paper setting when a
            recipe of the model uses that head (e.g. vgg19 + "apostolopoulos" -> 1024
            hidden units; mobilenet_v2 + "apostolopoulos" -> 1000, 750).
        pretrained: None (random Kaiming init), or a state dict / path of one:
            torchvision-named ImageNet weights (mapped by
            `covidcxr.models.weights.load_torchvision_state_dict`) or one of our own
            checkpoints (loaded by `covidcxr.models.weights.load_encoder`). Nothing is
            ever downloaded.
        head_kwargs: head builder arguments, overriding the recipe's.
        **kwargs: architecture arguments of the factory (e.g. ``batch_norm=True`` for
            VGG, ``width_mult`` for COVID-Net/MobileNetV2, ``width`` for conv8).

    Returns:
        The model (train mode), with ``default_cfg`` filled in.

    Raises:
        CovidCXRError: unknown model name or recipe (the message lists the known ones),
            unknown head, or weights that do not fit.

    Example:
        >>> model = create_model("resnet50.benahmed2021")
        >>> model.default_cfg["freeze_policy"]
        'all_but_batchnorm'
    """
    entry, recipe_key = _lookup(name)
    recipe = entry.cfg.recipes.get(recipe_key) if recipe_key else None
    if pretrained is True:  # a habit from timm/torchvision: say why it cannot work here
        raise CovidCXRError(
            "pretrained=True would download weights, which covidcxr never does: pass the path of a "
            "torchvision-named state dict you downloaded elsewhere, or one of our checkpoints"
        )
    if isinstance(head, nn.Module):
        head_name, resolved_kwargs = type(head).__name__, {}
        if head_kwargs:
            raise CovidCXRError("head_kwargs only apply to a head given by name")
    else:
        if head == "default":
            head_name = recipe.head if recipe else "linear"
            resolved_kwargs = dict(recipe.head_kwargs) if recipe else {}
        else:
            head_name = head
            preset = next((r for r in entry.cfg.recipes.values() if r.head == head), None)
            resolved_kwargs = dict(preset.head_kwargs) if preset else {}
        resolved_kwargs.update(head_kwargs or {})
    model = entry.factory(
        num_classes=num_classes,
        in_channels=in_channels,
        head=head if isinstance(head, nn.Module) else head_name,
        head_kwargs=resolved_kwargs or None,
        **kwargs,
    )
    cfg = _cfg_dict(entry, recipe_key)
    cfg.update(
        input_size=(in_channels, *entry.cfg.input_size[1:]),
        num_classes=num_classes,
        in_channels=in_channels,
        head=head_name,
        head_kwargs=resolved_kwargs,
        num_features=model.num_features,
        gradcam_layer=model.gradcam_layer,
        arch_kwargs=dict(kwargs),
    )
    model.default_cfg = cfg
    if pretrained is not None:
        from covidcxr.models.weights import load_pretrained

        load_pretrained(model, pretrained)
    return model
