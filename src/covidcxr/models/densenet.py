"""DenseNet-121 (Huang et al. 2017) on MONAI's ``DenseNet121``, split into stages.

MONAI builds the network; we regroup the children of its ``features`` so that each stage
ends at one resolution (as ResNet's): ``stages[0]`` = conv0/norm0/relu0/pool0 (stride 4),
``stages[1]`` = denseblock1 (stride 4), ``stages[2]`` = transition1 + denseblock2 (8),
``stages[3]`` = transition2 + denseblock3 (16), ``stages[4]`` = transition3 + denseblock4
+ norm5 + ReLU (32). MONAI applies that final ReLU in its classifier (``class_layers``),
which we drop; keeping it in the last stage makes the feature map the post-activation one
Grad-CAM and the embedding want (torchvision does the same with ``F.relu``).

Example:
    >>> model = create_model("densenet121")
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 1024, 7, 7])
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from monai.networks.nets import DenseNet121 as MonaiDenseNet121
from torch import nn

from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["DenseNetClassifier", "densenet121"]

_STAGE_KEY = re.compile(r"^stages\.[0-4]\.(.*)$")


class DenseNetClassifier(CXRClassifier):
    """DenseNet-121 (MONAI) as a `CXRClassifier`.

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module.
        head_kwargs: head builder arguments.
        dropout_prob: dropout inside each dense layer (MONAI's ``dropout_prob``; 0 as in
            the original).

    Shapes:
        (B, in_channels, H, W) -> features (B, 1024, H/32, W/32) -> logits (B, num_classes).
    """

    torchvision_head_prefixes = ("classifier.",)

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_channels)
        net = MonaiDenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1, dropout_prob=dropout_prob)
        f = net.features
        self.stages = nn.ModuleList(
            [
                nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0)),
                nn.Sequential(OrderedDict(denseblock1=f.denseblock1)),
                nn.Sequential(OrderedDict(transition1=f.transition1, denseblock2=f.denseblock2)),
                nn.Sequential(OrderedDict(transition2=f.transition2, denseblock3=f.denseblock3)),
                nn.Sequential(
                    OrderedDict(
                        transition3=f.transition3,
                        denseblock4=f.denseblock4,
                        norm5=f.norm5,
                        relu5=nn.ReLU(inplace=True),
                    )
                ),
            ]
        )
        self.num_features = f.norm5.num_features
        self.init_head(head, head_kwargs)

    def torchvision_name(self, key: str) -> str:
        """``stages.2.denseblock2.denselayer1.layers.norm1.weight`` ->
        ``features.denseblock2.denselayer1.norm1.weight`` (MONAI nests each dense layer's
        modules in a ``layers`` Sequential; torchvision does not)."""
        match = _STAGE_KEY.match(key)
        if match is None:
            return super().torchvision_name(key)
        rest = re.sub(r"(denselayer\d+)\.layers\.", r"\1.", match.group(1))
        return f"features.{rest}"


@register_model(
    "densenet121",
    ModelCfg(
        architecture="DenseNet-121 (MONAI), growth 32, blocks (6, 12, 24, 16)",
        input_size=(1, 224, 224),
        recipes={
            "tartaglione2020": Recipe(
                head="linear",
                freeze_policy="none",
                notes=(
                    "Table 2 / Sec. 4.4: DenseNet-121 with a pre-trained encoder; the paper and released code "
                    "give no head, so a linear one."
                ),
            ),
        },
        default_recipe="tartaglione2020",
        references=("huang2017",),
        torchvision_arch="densenet121",
        notes=(
            "stages = [stem, denseblock1, transition1+denseblock2, transition2+denseblock3, "
            "transition3+denseblock4+norm5+ReLU]."
        ),
    ),
)
def densenet121(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
    dropout_prob: float = 0.0,
) -> DenseNetClassifier:
    """DenseNet-121: 6.95 M backbone parameters with 1 input channel."""
    return DenseNetClassifier(num_classes, in_channels, head, head_kwargs, dropout_prob)
