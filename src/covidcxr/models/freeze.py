"""Freeze policies of the papers' fine-tuning recipes, and parameter counting.

``apply_freeze_policy(model, policy)`` sets ``requires_grad`` on every parameter; policies
are absolute (each call starts from "everything trainable"), and the head is always
trainable:

================================  ======================================================
policy                            trainable
================================  ======================================================
``"none"``                        everything (training from scratch, Tartaglione et al.'s
                                  fine-tuning of a pre-trained encoder)
``"backbone"``                    the head only (Hall et al. 2020, Sec. 3: convolutional
                                  layers used "without change")
``"all_but_batchnorm"``           the head and the affine weight/bias of every backbone
                                  BatchNorm (Ben Ahmed et al. 2021, Finetune1: "all the
                                  layers of the base model were frozen ... except the
                                  Batch Normalization layer"); ResNet-50 + ``benahmed``
                                  head: 53,120 + 131,329 = 184,449 ("184K")
``{"trainable_last_stages": k}``  the head and the last k of ``model.stages`` (Ben Ahmed
                                  Finetune2, "unfreeze the last 2 convolutional layers",
                                  read as stages; ``k = 0`` equals ``"backbone"``)
``{"layer_cutoff": n}``           all but the first n "layers" of
                                  ``model.layer_sequence()`` (Apostolopoulos & Mpesiana
                                  2020, Table 1: "the number of untrainable layers
                                  starting from the bottom")
================================  ======================================================

What a "layer" is (``{"layer_cutoff": n, "count": ...}``; see each model's
``default_cfg["layer_definition"]``):

* vgg16, vgg19, mobilenet_v2 (``count="keras"``, their default): the layer list of the
  Keras application Apostolopoulos & Mpesiana cut, where the input, pooling, padding,
  activation and add layers count too (VGG19: 22 layers, cutoff 18 = up to
  ``block5_conv1``; MobileNetV2: 155 layers, cutoff 10 = stem + first block).
* every model with ``count="parametrised"`` (the default of all other models): each
  module owning parameters (convolution, BatchNorm, linear) in forward order, so a conv
  and its BatchNorm are two layers (as in Keras, where BatchNormalization is a layer).

Counting Keras-style parametrised layers only on VGG19 would make cutoff 18 exceed its 16
convolutions and freeze the whole backbone, which contradicts the paper's "the rest of
the layers, closer to the output features, are made trainable": hence the Keras lists.

Frozen BatchNorm: a BatchNorm whose affine parameters are frozen should also keep its
running statistics (Keras >= 2.1.3/TF2 run frozen BN in inference mode; updating the
statistics of ImageNet features on a few hundred X-rays, with batch statistics in the
forward pass, silently changes a "frozen" backbone). ``apply_freeze_policy`` sets
``model.frozen_bn_eval = True`` so that ``model.train()`` puts those BatchNorms back in
eval mode by itself; a training loop using another module's ``train()`` calls
`set_frozen_batchnorm_eval` after it. Trainable BatchNorms (Ben Ahmed's Finetune1)
stay in train mode and update their statistics, which is the point of that recipe
("to update the mean and variance statistics of the new dataset").

Example:
    >>> model = create_model("resnet50.benahmed2021")
    >>> apply_freeze_policy(model, "all_but_batchnorm")
    {'total': 23633089, 'trainable': 184449}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier

__all__ = ["FREEZE_POLICIES", "apply_freeze_policy", "count_parameters", "set_frozen_batchnorm_eval"]

#: Named (string) policies; dict policies: ``trainable_last_stages``, ``layer_cutoff``.
FREEZE_POLICIES = ("none", "backbone", "all_but_batchnorm")

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "trainable": those with requires_grad}``.

    Example:
        >>> count_parameters(create_model("resnet18", head="linear"))
        {'total': 11170753, 'trainable': 11170753}
    """
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable}


def _backbone_modules(model: CXRClassifier) -> list[nn.Module]:
    return list(model.stages.modules())


def apply_freeze_policy(
    model: CXRClassifier,
    policy: str | Mapping[str, Any] | None,
    *,
    frozen_bn_eval: bool = True,
) -> dict[str, int]:
    """Set ``requires_grad`` of every parameter according to a fine-tuning policy.

    Args:
        model: a `CXRClassifier`.
        policy: "none", "backbone", "all_but_batchnorm", ``{"trainable_last_stages": k}``,
            or ``{"layer_cutoff": n}`` / ``{"layer_cutoff": n, "count": "keras" |
            "parametrised"}`` (see the module docstring). None means "none".
        frozen_bn_eval: keep frozen BatchNorms in eval mode during training (recorded
            on the model as ``model.frozen_bn_eval``; applied now if it is training).

    Returns:
        `count_parameters` of the model after the policy.

    Raises:
        CovidCXRError: unknown policy, or k / n out of range (the message says the range).

    Example:
        >>> model = create_model("vgg19.apostolopoulos2020")
        >>> counts = apply_freeze_policy(model, model.default_cfg["freeze_policy"])
    """
    if not isinstance(model, CXRClassifier):
        raise CovidCXRError(f"freeze policies apply to CXRClassifier models, got {type(model).__name__}")
    policy = "none" if policy is None else policy
    for param in model.parameters():
        param.requires_grad_(True)

    def freeze_backbone() -> None:
        for _, param in model.backbone_named_parameters():
            param.requires_grad_(False)

    if isinstance(policy, str):
        if policy == "none":
            pass
        elif policy == "backbone":
            freeze_backbone()
        elif policy == "all_but_batchnorm":
            freeze_backbone()
            for module in _backbone_modules(model):
                if isinstance(module, _BATCHNORM):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(True)
        else:
            raise CovidCXRError(
                f"unknown freeze policy '{policy}'; known: {', '.join(FREEZE_POLICIES)}, "
                "{'trainable_last_stages': k}, {'layer_cutoff': n}"
            )
    elif isinstance(policy, Mapping):
        keys = set(policy)
        if keys == {"trainable_last_stages"}:
            k = policy["trainable_last_stages"]
            n_stages = len(model.stages)
            if not isinstance(k, int) or not 0 <= k <= n_stages:
                raise CovidCXRError(f"trainable_last_stages must be an integer in 0..{n_stages} for this model, got {k!r}")
            freeze_backbone()
            for stage in list(model.stages)[n_stages - k :]:
                for param in stage.parameters():
                    param.requires_grad_(True)
        elif "layer_cutoff" in keys and keys <= {"layer_cutoff", "count"}:
            n = policy["layer_cutoff"]
            layers = model.layer_sequence(policy.get("count", "default"))
            if not isinstance(n, int) or not 0 <= n <= len(layers):
                raise CovidCXRError(f"layer_cutoff must be an integer in 0..{len(layers)} for this model, got {n!r}")
            for _, module in layers[:n]:
                if module is not None:
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(False)
        else:
            raise CovidCXRError(
                f"unknown freeze policy {dict(policy)!r}; dict policies are {{'trainable_last_stages': k}} "
                "and {'layer_cutoff': n[, 'count': 'keras' | 'parametrised']}"
            )
    else:
        raise CovidCXRError(f"a freeze policy is a string or a dict, got {type(policy).__name__}")

    model.frozen_bn_eval = frozen_bn_eval
    if frozen_bn_eval and model.training:
        set_frozen_batchnorm_eval(model)
    elif not frozen_bn_eval and model.training:
        model.train()
    return count_parameters(model)


def set_frozen_batchnorm_eval(model: nn.Module) -> list[str]:
    """Put every BatchNorm whose affine parameters are all frozen into eval mode.

    Call after ``model.train()`` in a training loop (a `CXRClassifier` frozen by
    `apply_freeze_policy` does it in its own ``train()``). A BatchNorm without affine
    parameters counts as frozen only if everything around it in its parent is frozen;
    every BatchNorm here is affine.

    Args:
        model: any module.

    Returns:
        The names of the BatchNorm modules put in eval mode.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORM):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                names.append(name)
    return names
