"""ResNet-18 and ResNet-50 (He et al. 2016) on MONAI's implementation, split into stages.

MONAI's ``monai.networks.nets.resnet18/resnet50`` builds the network; we only regroup its
modules: ``stages[0]`` = conv1 -> bn1 -> ReLU -> max-pool (the stem), ``stages[1..4]`` =
``layer1..layer4``. MONAI's ``avgpool``/``fc`` are not kept (our heads pool).

Two MONAI defaults are changed to get the original (torchvision/Keras) ResNet:

* ``conv1_t_stride=2``: the original 7x7 stride-2 first convolution. MONAI defaults to
  stride 1, which quadruples the work of every later layer and gives a 14x14 instead of a
  7x7 feature map at 224 px.
* ``bias_downsample=False``: the 1x1 projection shortcuts have no bias in the original
  (MONAI keeps one by default for its MedicalNet weights); without it the state dict maps
  one-to-one onto torchvision's and Ben Ahmed's 184K trainable-parameter count holds.

Example:
    >>> model = create_model("resnet18")            # Tartaglione et al.'s head
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 512, 7, 7])
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from monai.networks.nets import resnet18 as monai_resnet18
from monai.networks.nets import resnet50 as monai_resnet50
from torch import nn

from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["ResNetClassifier", "resnet18", "resnet50"]

_MONAI_BUILDERS = {"resnet18": monai_resnet18, "resnet50": monai_resnet50}
_LAYER_KEY = re.compile(r"^stages\.([1-4])\.(.*)$")


class ResNetClassifier(CXRClassifier):
    """ResNet (MONAI) as a `CXRClassifier`.

    Args:
        depth: "resnet18" or "resnet50".
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module (see `covidcxr.models.heads`).
        head_kwargs: head builder arguments.

    Shapes:
        (B, in_channels, H, W) -> features (B, 512 | 2048, H/32, W/32) -> logits (B, num_classes).
    """

    torchvision_head_prefixes = ("fc.",)

    def __init__(
        self,
        depth: str = "resnet18",
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels)
        net = _MONAI_BUILDERS[depth](
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, act=net.act, maxpool=net.maxpool))
        self.stages = nn.ModuleList([stem, net.layer1, net.layer2, net.layer3, net.layer4])
        last_block = net.layer4[-1]
        self.num_features = (last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2).num_features
        self.depth = depth
        self.init_head(head, head_kwargs)

    def torchvision_name(self, key: str) -> str:
        """``stages.0.conv1.weight`` -> ``conv1.weight``; ``stages.2.0.bn1.bias`` -> ``layer2.0.bn1.bias``."""
        if key.startswith("stages.0."):
            return key[len("stages.0.") :]
        match = _LAYER_KEY.match(key)
        if match is None:
            return super().torchvision_name(key)
        return f"layer{match.group(1)}.{match.group(2)}"


_NOTES = (
    "MONAI ResNet with conv1_t_stride=2 (original stride-2 stem) and bias_downsample=False "
    "(original bias-free projection shortcuts); stages = [stem, layer1..layer4]."
)


@register_model(
    "resnet18",
    ModelCfg(
        architecture="ResNet-18 (MONAI), 7x7 stride-2 stem, 4 stages of basic blocks",
        input_size=(1, 224, 224),
        recipes={
            "tartaglione2020": Recipe(
                head="tartaglione",
                head_kwargs={"hidden": 256},
                freeze_policy="none",
                notes=(
                    "Sec. 3.3/4.1: encoder pre-trained on a pneumonia task (RSNA or ChestXRay) then fine-tuned "
                    "on COVID data; head 512->256->1 and 224 px crops from their released code. Their "
                    "1-channel conv1 kept the red channel of the ImageNet kernel."
                ),
            ),
        },
        default_recipe="tartaglione2020",
        references=("he2016",),
        torchvision_arch="resnet18",
        notes=_NOTES,
    ),
)
def resnet18(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
) -> ResNetClassifier:
    """ResNet-18: 11.17 M parameters with 1 input channel and a 1-logit linear head."""
    return ResNetClassifier("resnet18", num_classes, in_channels, head, head_kwargs)


@register_model(
    "resnet50",
    ModelCfg(
        architecture="ResNet-50 (MONAI), 7x7 stride-2 stem, 4 stages of bottleneck blocks",
        input_size=(1, 224, 224),
        recipes={
            "benahmed2021": Recipe(
                head="benahmed",
                head_kwargs={"hidden": 64, "dropout": 0.5},
                freeze_policy="all_but_batchnorm",
                notes=(
                    "Sec. II-C, Table 2 (Finetune1): ImageNet ResNet-50, all layers frozen except BatchNorm, "
                    "GAP -> FC64 ReLU -> Dropout 0.5 -> BN -> FC1 sigmoid; 184K trainable parameters. "
                    "Finetune2 (Table 3) unfreezes 'the last two convolutional layers': "
                    "{'trainable_last_stages': k} or {'layer_cutoff': n} approximate it."
                ),
            ),
            "hall2020": Recipe(
                head="hall",
                head_kwargs={"hidden": 64, "dropout": 0.5},
                freeze_policy="backbone",
                notes=(
                    "Sec. 3: ImageNet conv layers 'without change' (frozen), GAP -> FC64 with dropout -> "
                    "sigmoid; RMSprop, cyclic LR 1e-4..1e-3; gray image replicated to RGB at 224 px."
                ),
            ),
            "tartaglione2020": Recipe(
                head="tartaglione",
                head_kwargs={"hidden": 512},
                freeze_policy="none",
                notes="Sec. 4.4: as ResNet-18 with head 2048->512->1 (released code).",
            ),
        },
        default_recipe="benahmed2021",
        references=("he2016",),
        torchvision_arch="resnet50",
        notes=_NOTES,
    ),
)
def resnet50(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
) -> ResNetClassifier:
    """ResNet-50: 23.5 M backbone parameters with 1 input channel."""
    return ResNetClassifier("resnet50", num_classes, in_channels, head, head_kwargs)
