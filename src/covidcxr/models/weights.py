"""Initialising a model: random (as built), torchvision-named ImageNet weights, our own checkpoints.

(a) Random: every network initialises itself when built (Kaiming-normal convolutions as
    in the reference implementations, BatchNorm weight 1 / bias 0, small-normal logits).

(b) `load_torchvision_state_dict`: ImageNet weights a user downloaded elsewhere (this
    project never downloads), in torchvision's naming, mapped onto our modules by each
    model's ``torchvision_name`` (ResNet ``layer1.0.conv1.weight``, VGG
    ``features.0.weight``, DenseNet ``features.denseblock1.denselayer1.norm1.weight``,
    MobileNetV2 ``features.1.conv.0.0.weight``). The classifier (``fc``/``classifier``)
    is never loaded: it predicts the 1000 ImageNet classes. The RGB first convolution is
    adapted to ``in_channels``: for 1 channel its kernel is summed over the RGB axis,
    because Hall et al. and Ben Ahmed et al. feed the gray image replicated to three
    channels, and ``sum_c W_c * x = (sum_c W_c) * x``: the summed kernel on the 1-channel
    image computes exactly what the RGB network computes on the replicated image, with a
    third of that layer's work (when a single normalisation is applied to the gray image
    before replication). Taking one channel (Tartaglione et al.'s code keeps red) or the
    mean changes the first layer's output scale; ``rgb_to_gray="red"|"mean"`` offer them.
    Other channel counts repeat the RGB kernels cyclically, scaled by 3/in_channels (the
    timm convention).

(c) `load_encoder`: the backbone of one of our own runs (e.g. pneumonia pre-training
    before COVID fine-tuning, Tartaglione et al. Sec. 4.1-4.2): a plain state dict, a
    ``{"state_dict": ...}``/``{"model": ...}`` checkpoint, or a Lightning checkpoint whose
    keys carry a prefix (``model.``); the head is excluded.

Files are read with ``torch.load(path, weights_only=True, map_location="cpu")``: a
checkpoint cannot run code when loaded.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier

__all__ = [
    "LoadReport",
    "WeightLoadError",
    "load_encoder",
    "load_pretrained",
    "load_torchvision_state_dict",
    "to_torchvision_state_dict",
]

_OPTIONAL = ("num_batches_tracked",)  # absent from old checkpoints; never required
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class WeightLoadError(CovidCXRError):
    """Weights do not fit the model; lists every problem in both directions.

    Attributes:
        missing: keys the model needs that the weights lack (in the weights' naming).
        unexpected: keys of the weights that map to nothing in the model.
        mismatched: ``"key: weights (shape) vs model (shape)"`` lines.
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [message]
        for title, items in (
            ("missing from the weights", missing),
            ("unexpected in the weights", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = "\n    ".join(items[:40])
                more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
                lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
        super().__init__("\n".join(lines))


@dataclass
class LoadReport:
    """What a load did.

    Attributes:
        loaded: model keys that received a tensor.
        skipped_head: keys of the weights' classifier, deliberately not loaded.
        adapted: model keys whose tensor was adapted (the first convolution's input channels).
        missing / unexpected / mismatched: as `WeightLoadError` (empty after a strict load).
    """

    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _read(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise CovidCXRError(f"weights file {path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise CovidCXRError(
            f"cannot read {path} as a tensors-only checkpoint (weights_only=True refuses pickled objects): {exc}. "
            "Save the weights as a plain state dict (torch.save(model.state_dict(), path))."
        ) from exc


def _state_dict_of(obj: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: itself, or its "state_dict"/"model" entry."""
    for key in ("state_dict", "model", "model_state_dict"):
        inner = obj.get(key) if isinstance(obj, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CovidCXRError(
        f"{where} holds no state dict (expected a dict of tensors, or one under 'state_dict' or 'model'); "
        f"top-level keys: {', '.join(list(map(str, obj))[:10])}"
    )


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel saves ``module.``-prefixed keys; drop the prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _adapt_first_conv(weight: torch.Tensor, in_channels: int, rgb_to_gray: str) -> torch.Tensor:
    """(O, 3, k, k) RGB kernel -> (O, in_channels, k, k); see the module docstring."""
    if in_channels == 1:
        if rgb_to_gray == "sum":
            return weight.sum(dim=1, keepdim=True)
        if rgb_to_gray == "mean":
            return weight.mean(dim=1, keepdim=True)
        if rgb_to_gray == "red":
            return weight[:, :1].clone()
        raise CovidCXRError(f"rgb_to_gray must be 'sum', 'mean' or 'red', got {rgb_to_gray!r}")
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_torchvision_state_dict(
    model: CXRClassifier,
    state_dict: str | Path | Mapping[str, torch.Tensor],
    strict_backbone: bool = True,
    rgb_to_gray: str = "sum",
) -> LoadReport:
    """Load torchvision-named weights (e.g. ImageNet) into the model's backbone.

    Args:
        model: a `CXRClassifier` with a torchvision counterpart (resnet18, resnet50,
            densenet121, vgg16, vgg19 and their ``batch_norm=True`` variants,
            mobilenet_v2).
        state_dict: the state dict, or the path of a file holding one (read with
            ``weights_only=True``).
        strict_backbone: raise on any backbone key missing from the weights, any
            weights key that maps to nothing, or any shape mismatch (default). When
            False, load what fits and report the rest.
        rgb_to_gray: how a 3-channel first convolution becomes a 1-channel one: "sum"
            (default; exact for a gray image replicated to RGB), "mean" or "red".

    Returns:
        A `LoadReport`.

    Raises:
        WeightLoadError: (strict) the listing of unmatched keys in both directions and of
            shape mismatches, in torchvision naming.
        CovidCXRError: the model has no torchvision counterpart, or the file is unreadable.

    Example:
        >>> model = create_model("resnet50.benahmed2021")
        >>> report = load_torchvision_state_dict(model, "resnet50-11ad3fa6.pth")  # doctest: +SKIP
        >>> report.skipped_head  # doctest: +SKIP
        ['fc.weight', 'fc.bias']
    """
    source = _strip_module_prefix(_state_dict_of(_read(state_dict), str(state_dict) if not isinstance(state_dict, Mapping) else "the state dict"))
    own = model.state_dict()
    # our backbone key -> torchvision key, and back
    to_tv = {key: model.torchvision_name(key) for key in own if key.startswith("stages.")}
    from_tv = {tv: ours for ours, tv in to_tv.items()}
    first_conv = next(key for key, value in own.items() if key.startswith("stages.") and value.ndim == 4)

    report = LoadReport()
    updates: dict[str, torch.Tensor] = {}
    for tv_key, tensor in source.items():
        tv_key = _LEGACY_DENSENET.sub(r"\1\2", tv_key)
        if any(tv_key.startswith(prefix) for prefix in model.torchvision_head_prefixes):
            report.skipped_head.append(tv_key)
            continue
        ours = from_tv.get(tv_key)
        if ours is None:
            report.unexpected.append(tv_key)
            continue
        target = own[ours]
        if ours == first_conv and tensor.ndim == 4 and tensor.shape[1] != target.shape[1] and tensor.shape[0] == target.shape[0]:
            tensor = _adapt_first_conv(tensor, target.shape[1], rgb_to_gray)
            report.adapted.append(ours)
        if tuple(tensor.shape) != tuple(target.shape):
            report.mismatched.append(f"{tv_key}: weights {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        updates[ours] = tensor
    report.missing = [
        tv for ours, tv in to_tv.items() if ours not in updates and not ours.endswith(_OPTIONAL)
        and tv not in {m.split(":")[0] for m in report.mismatched}
    ]
    if strict_backbone and (report.missing or report.unexpected or report.mismatched):
        raise WeightLoadError(
            f"torchvision weights do not fit {type(model).__name__} "
            f"({model.default_cfg.get('name', '')}, in_channels={model.in_channels})",
            report.missing,
            report.unexpected,
            report.mismatched,
        )
    _copy_into(model, updates)
    report.loaded = sorted(updates)
    return report


def to_torchvision_state_dict(model: CXRClassifier) -> dict[str, torch.Tensor]:
    """The backbone's state dict in torchvision naming (inverse of the mapping; no head).

    Useful to check the mapping and to hand our backbone to torchvision-based tools.
    """
    return {model.torchvision_name(k): v.detach().clone() for k, v in model.state_dict().items() if k.startswith("stages.")}


def _copy_into(model: CXRClassifier, updates: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in updates.items():
            own[key].copy_(tensor.to(dtype=own[key].dtype))


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    """The prefix p such that ``p + anchor`` is a key (``""``, ``"model."``, ``"model.module."``...)."""
    candidates = sorted((k[: len(k) - len(anchor)] for k in keys if k.endswith(anchor)), key=len)
    for prefix in candidates:
        if prefix == "" or prefix.endswith("."):
            return prefix
    return None


def load_encoder(
    model: CXRClassifier,
    checkpoint_path: str | Path | Mapping[str, Any],
    prefix: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load the backbone (``stages.*``) of one of our own checkpoints; the head is excluded.

    Args:
        model: the model to initialise; its architecture (and ``in_channels``) must be
            the checkpoint's.
        checkpoint_path: a file (read with ``weights_only=True``) or an already loaded
            object: a plain state dict, ``{"state_dict": ...}`` (Lightning, keys
            prefixed with the LightningModule attribute, e.g. ``model.``) or
            ``{"model": ...}``.
        prefix: the key prefix before ``stages.``; found automatically when None.
        strict: raise on any missing/unexpected backbone key or shape mismatch.

    Returns:
        A `LoadReport` (``skipped_head`` lists the checkpoint's head keys).

    Raises:
        WeightLoadError: the checkpoint's backbone is not this architecture (listing).
        CovidCXRError: no state dict in the file, or no backbone key found at all.

    Example:
        >>> pneumonia = create_model("resnet18", num_classes=3)   # pre-trained elsewhere
        >>> covid = create_model("resnet18", num_classes=1)
        >>> report = load_encoder(covid, {"state_dict": {"model." + k: v for k, v in pneumonia.state_dict().items()}})
        >>> len(report.skipped_head) > 0
        True
    """
    where = str(checkpoint_path) if not isinstance(checkpoint_path, Mapping) else "the checkpoint"
    state = _state_dict_of(_read(checkpoint_path), where)
    own = {k: v for k, v in model.state_dict().items() if k.startswith("stages.")}
    anchor = next(iter(own))
    if prefix is None:
        prefix = _find_prefix(list(state), anchor)
        if prefix is None:
            raise CovidCXRError(
                f"{where} does not hold a {type(model).__name__} backbone: no key ends with '{anchor}'. "
                f"Its first keys: {', '.join(list(state)[:8])}"
            )
    body = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    report = LoadReport()
    updates: dict[str, torch.Tensor] = {}
    for key, tensor in body.items():
        if key.startswith("head."):
            report.skipped_head.append(prefix + key)
            continue
        if key not in own:
            report.unexpected.append(prefix + key)
            continue
        if tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{prefix}{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
            continue
        updates[key] = tensor
    mismatched_keys = {m.split(":")[0][len(prefix) :] for m in report.mismatched}
    report.missing = [prefix + k for k in own if k not in updates and k not in mismatched_keys and not k.endswith(_OPTIONAL)]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise WeightLoadError(
            f"architecture mismatch: {where} (prefix '{prefix}') does not hold the backbone of "
            f"{type(model).__name__} ({model.default_cfg.get('name', '')}, in_channels={model.in_channels})",
            report.missing,
            report.unexpected,
            report.mismatched,
        )
    _copy_into(model, updates)
    report.loaded = sorted(updates)
    return report


def load_pretrained(model: CXRClassifier, source: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load ``source`` as our own checkpoint if its keys use our naming (``stages.``),
    else as torchvision-named weights. What ``create_model(..., pretrained=...)`` calls."""
    obj = _read(source)
    state = _state_dict_of(obj, str(source) if not isinstance(source, Mapping) else "the weights")
    if any(".stages." in k or k.startswith("stages.") for k in state):
        return load_encoder(model, {"state_dict": state})
    return load_torchvision_state_dict(model, state)
