"""MobileNetV2 (Sandler et al. 2018), written here: MONAI has no MobileNetV2.

Inverted residual blocks: 1x1 expansion (x t) -> 3x3 depthwise -> 1x1 linear projection,
with an identity shortcut when stride is 1 and the width is unchanged; BatchNorm after
every convolution, ReLU6 after all but the projection (the "linear bottleneck", Sandler
et al. Sec. 3.2). The module tree mirrors torchvision's ``mobilenet_v2`` (each block's
``conv`` Sequential, ``ConvBNReLU`` = [conv, bn, relu6]) so its weights map one-to-one.

Stages (by output stride): ``stages[0]`` = stem conv + block 1 (16 ch, /2), ``stages[1]``
= 24-ch blocks (/4), ``stages[2]`` = 32-ch (/8), ``stages[3]`` = 64- and 96-ch (/16),
``stages[4]`` = 160- and 320-ch blocks + the 1x1 conv to 1280 channels (/32).

Example:
    >>> model = create_model("mobilenet_v2")       # Apostolopoulos & Mpesiana's head
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 1280, 7, 7])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["InvertedResidual", "MobileNetV2Classifier", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s): Sandler et al. Table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# torchvision feature indices per stage (0 = stem conv, 1..17 = blocks, 18 = last 1x1 conv).
_STAGE_INDICES = ((0, 1), (2, 3), (4, 5, 6), (7, 8, 9, 10, 11, 12, 13), (14, 15, 16, 17, 18))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor``, never below 90% of it (as the reference code)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6, padding 'same' for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Inverted residual block: [1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6
    -> 1x1 project -> BN, plus the input when stride is 1 and widths match.

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expands = expand_ratio != 1
        layers: list[nn.Module] = []
        if self.expands:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.stride = stride

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Classifier(CXRClassifier):
    """MobileNetV2 as a `CXRClassifier`.

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module.
        head_kwargs: head builder arguments.
        width_mult: width multiplier alpha (1.0 = the paper's network).

    Shapes:
        (B, in_channels, H, W) -> features (B, 1280, H/32, W/32) -> logits (B, num_classes).
    """

    torchvision_head_prefixes = ("classifier.",)

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__(num_classes, in_channels)
        self.width_mult = width_mult
        channels = _make_divisible(32 * width_mult)
        last_channels = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, channels, stride=2)]
        for t, c, n, s in _SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU6(channels, last_channels, kernel_size=1))
        self.stages = nn.ModuleList([nn.Sequential(*(features[i] for i in idx)) for idx in _STAGE_INDICES])
        self.num_features = last_channels
        self._torchvision_index = {
            (s, j): i for s, idx in enumerate(_STAGE_INDICES) for j, i in enumerate(idx)
        }
        self.init_stage_weights()
        self.init_head(head, head_kwargs)

    def torchvision_name(self, key: str) -> str:
        """``stages.1.0.conv.1.0.weight`` -> ``features.2.conv.1.0.weight``."""
        return self.flat_features_name(key, self._torchvision_index)

    def _blocks(self) -> list[nn.Module]:
        return [module for stage in self.stages for module in stage]

    def layer_sequence(self, count: str = "default") -> list[tuple[str, nn.Module | None]]:
        """Keras ``MobileNetV2(include_top=False).layers`` by default (``count="keras"``).

        The list of keras-applications 1.0.8 (Keras 2.3 / TF 2.0-2.1, the versions of
        March 2020 when Apostolopoulos & Mpesiana submitted): ``input_1, Conv1_pad,
        Conv1, bn_Conv1, Conv1_relu``; block 0 ``expanded_conv_depthwise, _BN, _relu,
        _project, _project_BN``; blocks k = 1..16 ``block_k_expand, _expand_BN,
        _expand_relu, [block_k_pad when stride 2], _depthwise, _depthwise_BN,
        _depthwise_relu, _project, _project_BN, [block_k_add when residual]``; then
        ``Conv_1, Conv_1_bn, out_relu``: 155 layers. "Layer cutoff 10" thus freezes the
        stem and block 0. (TF >= 2.2 dropped ``Conv1_pad``: 154 layers, and cutoff 10
        would also freeze ``block_1_expand``.) ``count="parametrised"``: convolutions
        and BatchNorms only.
        """
        if count == "parametrised":
            return super().layer_sequence("parametrised")
        if count not in ("default", "keras"):
            return super().layer_sequence(count)
        blocks = self._blocks()
        stem, final = blocks[0], blocks[-1]
        layers: list[tuple[str, nn.Module | None]] = [
            ("input_1", None),
            ("Conv1_pad", None),
            ("Conv1", stem[0]),
            ("bn_Conv1", stem[1]),
            ("Conv1_relu", None),
        ]
        for k, block in enumerate(blocks[1:-1]):
            prefix = f"block_{k}_" if k else "expanded_conv_"
            convs = list(block.conv)
            if block.expands:
                expand = convs.pop(0)
                layers += [(prefix + "expand", expand[0]), (prefix + "expand_BN", expand[1]), (prefix + "expand_relu", None)]
            depthwise, project, project_bn = convs
            if block.stride == 2:
                layers.append((prefix + "pad", None))
            layers += [
                (prefix + "depthwise", depthwise[0]),
                (prefix + "depthwise_BN", depthwise[1]),
                (prefix + "depthwise_relu", None),
                (prefix + "project", project),
                (prefix + "project_BN", project_bn),
            ]
            if block.use_residual:
                layers.append((prefix + "add", None))
        layers += [("Conv_1", final[0]), ("Conv_1_bn", final[1]), ("out_relu", None)]
        return layers


@register_model(
    "mobilenet_v2",
    ModelCfg(
        architecture="MobileNetV2 (inverted residuals, linear bottlenecks), width multiplier 1.0",
        input_size=(1, 224, 224),
        recipes={
            "apostolopoulos2020": Recipe(
                head="apostolopoulos",
                head_kwargs={"hidden": (1000, 750), "dropout": 0.5},
                freeze_policy={"layer_cutoff": 10},
                notes=(
                    "Table 1: layer cutoff 10 (Keras layer list: input_1 .. expanded_conv_project_BN), "
                    "'Neural Network' 1000 and 750 nodes with a Dropout layer (rate not given: 0.5); "
                    "Adam, 10 epochs, batch 64."
                ),
            ),
        },
        default_recipe="apostolopoulos2020",
        references=("sandler2018",),
        torchvision_arch="mobilenet_v2",
        layer_definition=(
            "Keras MobileNetV2(include_top=False).layers of keras-applications 1.0.8 (155 layers, incl. "
            "input, ZeroPadding, ReLU and Add layers); count='parametrised': conv and BatchNorm only"
        ),
    ),
)
def mobilenet_v2(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
    width_mult: float = 1.0,
) -> MobileNetV2Classifier:
    """MobileNetV2: 2.22 M backbone parameters with 1 input channel."""
    return MobileNetV2Classifier(num_classes, in_channels, head, head_kwargs, width_mult)
