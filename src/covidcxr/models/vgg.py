"""VGG-16 and VGG-19 (Simonyan & Zisserman 2015), written here: MONAI has no VGG.

The convolutional part only ("features"): five stages of 3x3 convolutions (stride 1,
padding 1, ReLU; optional BatchNorm after each, off by default as in the original), each
stage ending with a 2x2 max-pool, so a 224 px input gives a (B, 512, 7, 7) feature map.
The three 4096-unit fully connected layers of the original classifier are not built:
every paper using VGG here replaced them (Hall et al. 2020: GAP -> FC64; Apostolopoulos &
Mpesiana 2020: 1024 nodes; Ben Ahmed et al. 2021: their ResNet head).

Inside each stage the modules are ordered as torchvision's ``features`` Sequential
(conv, [bn], relu, ..., pool) so torchvision weights map index by index.

Example:
    >>> model = create_model("vgg16")              # Hall et al.'s head
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 512, 7, 7])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["VGGClassifier", "vgg16", "vgg19"]

# Output channels of the 3x3 convolutions per stage (torchvision cfgs "D" and "E").
_STAGES = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGClassifier(CXRClassifier):
    """VGG convolutional backbone as a `CXRClassifier`.

    Args:
        depth: "vgg16" or "vgg19".
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module.
        head_kwargs: head builder arguments.
        batch_norm: add BatchNorm after every convolution (torchvision's ``vgg16_bn``);
            False (default) is the original network the papers used.

    Shapes:
        (B, in_channels, H, W) -> features (B, 512, H/32, W/32) -> logits (B, num_classes).
    """

    torchvision_head_prefixes = ("classifier.",)

    def __init__(
        self,
        depth: str = "vgg16",
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels)
        if depth not in _STAGES:
            raise CovidCXRError(f"unknown VGG depth '{depth}'; known: {', '.join(_STAGES)}")
        self.depth = depth
        self.batch_norm = batch_norm
        stages = []
        # our key "stages.s.j" <-> torchvision "features.i": same module order, one flat list there.
        self._torchvision_index: dict[tuple[int, int], int] = {}
        flat_index = 0
        channels = in_channels
        for s, widths in enumerate(_STAGES[depth]):
            modules: list[nn.Module] = []
            for width in widths:
                block = [nn.Conv2d(channels, width, kernel_size=3, padding=1)]
                if batch_norm:
                    block.append(nn.BatchNorm2d(width))
                block.append(nn.ReLU(inplace=True))
                for module in block:
                    self._torchvision_index[(s, len(modules))] = flat_index
                    modules.append(module)
                    flat_index += 1
                channels = width
            self._torchvision_index[(s, len(modules))] = flat_index
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            flat_index += 1
            stages.append(nn.Sequential(*modules))
        self.stages = nn.ModuleList(stages)
        self.num_features = channels
        self.init_stage_weights()
        self.init_head(head, head_kwargs)

    def torchvision_name(self, key: str) -> str:
        """``stages.1.0.weight`` -> ``features.5.weight`` (VGG-16 without BatchNorm)."""
        return self.flat_features_name(key, self._torchvision_index)

    def layer_sequence(self, count: str = "default") -> list[tuple[str, nn.Module | None]]:
        """Keras ``VGG16/VGG19(include_top=False).layers`` by default (``count="keras"``).

        That list is: ``input_1``, then per stage b its convolutions
        ``block{b}_conv{i}`` (ReLU fused into the Keras Conv2D) and ``block{b}_pool``:
        19 layers for VGG-16, 22 for VGG-19. Apostolopoulos & Mpesiana's VGG19 "layer
        cutoff 18" therefore freezes ``input_1 .. block5_conv1`` (13 of 16 convolutions)
        and trains block5_conv2-4. With ``batch_norm=True`` (no Keras counterpart) each
        BatchNorm counts as one more layer right after its convolution.
        ``count="parametrised"`` gives the base class definition (convolutions, and
        BatchNorms when present).
        """
        if count == "parametrised":
            return super().layer_sequence("parametrised")
        if count not in ("default", "keras"):
            return super().layer_sequence(count)
        layers: list[tuple[str, nn.Module | None]] = [("input_1", None)]
        for s, stage in enumerate(self.stages):
            conv_index = 0
            for j, module in enumerate(stage):
                if isinstance(module, nn.Conv2d):
                    conv_index += 1
                    layers.append((f"stages.{s}.{j} (block{s + 1}_conv{conv_index})", module))
                elif isinstance(module, nn.BatchNorm2d):
                    layers.append((f"stages.{s}.{j} (block{s + 1}_bn{conv_index})", module))
                elif isinstance(module, nn.MaxPool2d):
                    layers.append((f"stages.{s}.{j} (block{s + 1}_pool)", None))
        return layers


_LAYERS = (
    "Keras VGG(include_top=False).layers: input_1, block{b}_conv{i} (ReLU fused), block{b}_pool "
    "(VGG-16: 19 layers, VGG-19: 22); count='parametrised' counts the convolutions only"
)


@register_model(
    "vgg16",
    ModelCfg(
        architecture="VGG-16 convolutional part (13 conv 3x3 + 5 max-pool), BatchNorm optional (off)",
        input_size=(1, 224, 224),
        recipes={
            "hall2020": Recipe(
                head="hall",
                head_kwargs={"hidden": 64, "dropout": 0.5},
                freeze_policy="backbone",
                notes=(
                    "Sec. 3: ImageNet VGG16 convolutional layers 'without change' (frozen), last layers replaced by "
                    "GAP -> FC64 with dropout -> sigmoid; gray image replicated to RGB at 224 px."
                ),
            ),
            "benahmed2021": Recipe(
                head="benahmed",
                head_kwargs={"hidden": 64, "dropout": 0.5},
                freeze_policy="all_but_batchnorm",
                notes=(
                    "Table 3: VGG-16 Finetune1/Finetune2 with the ResNet-50 recipe; VGG has no BatchNorm, so "
                    "Finetune1 trains the head only."
                ),
            ),
        },
        default_recipe="hall2020",
        references=("simonyan2015",),
        torchvision_arch="vgg16 (vgg16_bn with batch_norm=True)",
        layer_definition=_LAYERS,
        notes="The 4096-4096 classifier of the original is not built; heads pool the 512-channel map.",
    ),
)
def vgg16(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
    batch_norm: bool = False,
) -> VGGClassifier:
    """VGG-16 convolutional backbone: 14.71 M parameters with 1 input channel."""
    return VGGClassifier("vgg16", num_classes, in_channels, head, head_kwargs, batch_norm)


@register_model(
    "vgg19",
    ModelCfg(
        architecture="VGG-19 convolutional part (16 conv 3x3 + 5 max-pool), BatchNorm optional (off)",
        input_size=(1, 224, 224),
        recipes={
            "apostolopoulos2020": Recipe(
                head="apostolopoulos",
                head_kwargs={"hidden": (1024,)},
                freeze_policy={"layer_cutoff": 18},
                notes=(
                    "Table 1: layer cutoff 18 (untrainable layers from the bottom, Keras layer list: "
                    "input_1 .. block5_conv1), 'Neural Network' of 1024 nodes; Adam, 10 epochs, batch 64."
                ),
            ),
        },
        default_recipe="apostolopoulos2020",
        references=("simonyan2015",),
        torchvision_arch="vgg19 (vgg19_bn with batch_norm=True)",
        layer_definition=_LAYERS,
        notes="The 4096-4096 classifier of the original is not built; heads pool the 512-channel map.",
    ),
)
def vgg19(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
    batch_norm: bool = False,
) -> VGGClassifier:
    """VGG-19 convolutional backbone: 20.02 M parameters with 1 input channel."""
    return VGGClassifier("vgg19", num_classes, in_channels, head, head_kwargs, batch_norm)
