"""COVID-Net (Wang, Lin & Wong 2020), written here from the paper, with a width multiplier.

COVID-Net is a machine-designed network built from PEPX modules (Wang & Wong 2020,
Sec. 2.2, Fig. 2), each a chain of five convolutions:

1. first-stage Projection: 1x1, input -> lower dimension;
2. Expansion: 1x1, to a higher dimension (different from the input's);
3. Depth-wise representation: 3x3 depthwise;
4. second-stage Projection: 1x1, back to a lower dimension;
5. Extension: 1x1, to the module's output width.

Modules are grouped in four stages of 3, 4, 6 and 3 PEPX (like ResNet-50's blocks) after
a 7x7 stride-2 convolution; the "long-range connections" (the paper's densely connected
diagram) make every PEPX in a stage take the sum of the stage's 1x1-convolution shortcut
and of the outputs of all earlier PEPX of that stage, and the next stage start from the
(2x max-pooled) sum of everything the previous stage produced.

What the paper does not give, and what we chose (documented for the lead):

* Per-module widths come from generative synthesis and are shown only in Fig. 2; we use
  stage widths (56, 112, 216, 424) and a 56-channel stem, as the widely used PyTorch port
  read them off the figure, times ``width_mult`` (rounded to multiples of 8).
* PEPX internal ratios are not published: projection = 1/2 of the input width,
  expansion = 3/4 (i.e. 1.5x the projection), second projection = 1/2 (as the port).
* Normalisation/activations are not described: we put BatchNorm after every convolution
  (needed to train from scratch at our batch sizes), ReLU after expansion and depthwise,
  keep the projections and the extension linear (MobileNetV2's linear bottleneck), and
  apply ReLU to each long-range sum, as ResNet does after its additions.
* The stage shortcut is 1x1 conv + BatchNorm applied after the 2x max-pool (the port
  pools after the convolution; ours costs a quarter and is the same linear map up to
  where the max is taken).
* The original classifier flattens the last map into FC1024 -> FC256 -> FC; the
  ``covidnet`` head does the same on the GAP vector (``pool="flatten"`` restores it).
* Input: the released models take 480x480 RGB; our recipes use 224 px grayscale.

Example:
    >>> model = create_model("covidnet", width_mult=0.5)
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 216, 7, 7])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["PEPX", "CovidNetClassifier", "CovidNetStage", "covidnet"]

_BASE_WIDTHS = (56, 112, 216, 424)
_DEPTHS = (3, 4, 6, 3)


def _round8(value: float) -> int:
    """Nearest multiple of 8 (halves up), at least 8: SIMD-friendly widths."""
    return max(8, int(value + 4) // 8 * 8)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1, relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PEPX(nn.Module):
    """Projection-Expansion-Projection-eXtension module (Wang & Wong 2020, Sec. 2.2).

    Args:
        in_channels: input width.
        out_channels: output width (the extension's).
        projection: width of both projections, as a fraction of ``in_channels``.
        expansion: width of the expansion and depthwise convolutions, as a fraction of
            ``in_channels``.

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, projection: float = 0.5, expansion: float = 0.75) -> None:
        super().__init__()
        low = _round8(in_channels * projection)
        high = _round8(in_channels * expansion)
        self.projection1 = _conv_bn(in_channels, low)
        self.expansion = _conv_bn(low, high, relu=True)
        self.depthwise = _conv_bn(high, high, kernel_size=3, groups=high, relu=True)
        self.projection2 = _conv_bn(high, low)
        self.extension = _conv_bn(low, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection1(x)
        x = self.expansion(x)
        x = self.depthwise(x)
        x = self.projection2(x)
        return self.extension(x)


class CovidNetStage(nn.Module):
    """One COVID-Net stage: optional 2x max-pool, a 1x1 shortcut, and densely summed PEPX.

    ``input_k = ReLU(shortcut + sum_{j<k} pepx_j)`` for k >= 1, the first PEPX takes the
    stage input, and the stage returns ``ReLU(shortcut + sum_j pepx_j)``.

    Shapes:
        (B, in_channels, H, W) -> (B, out_channels, H/2 or H, W/2 or W).
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.shortcut = _conv_bn(in_channels, out_channels)
        self.pepx = nn.ModuleList(
            [PEPX(in_channels if k == 0 else out_channels, out_channels) for k in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.max_pool2d(x, 2)
        total = self.shortcut(x)
        h = x
        for module in self.pepx:
            total = total + module(h)
            h = F.relu(total)
        return h


class CovidNetClassifier(CXRClassifier):
    """COVID-Net as a `CXRClassifier` (see the module docstring for our choices).

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module.
        head_kwargs: head builder arguments.
        width_mult: multiplies the stem and stage widths (1.0: 56, 112, 216, 424).
        depths: PEPX modules per stage (paper: 3, 4, 6, 3).

    Shapes:
        (B, in_channels, H, W) -> features (B, 424 * width_mult, H/32, W/32) -> logits.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "covidnet",
        head_kwargs: dict[str, Any] | None = None,
        width_mult: float = 1.0,
        depths: tuple[int, ...] = _DEPTHS,
    ) -> None:
        super().__init__(num_classes, in_channels)
        if width_mult <= 0:
            raise CovidCXRError(f"width_mult must be > 0, got {width_mult}")
        if len(depths) != 4 or min(depths) < 1:
            raise CovidCXRError(f"depths must be 4 positive module counts, got {depths}")
        self.width_mult = width_mult
        widths = [_round8(w * width_mult) for w in _BASE_WIDTHS]
        stem_width = widths[0]
        stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        stages: list[nn.Module] = [stem]
        channels = stem_width
        for s, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stages.append(CovidNetStage(channels, width, depth, downsample=s > 0))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.num_features = channels
        self.init_stage_weights()
        self.init_head(head, head_kwargs)


@register_model(
    "covidnet",
    ModelCfg(
        architecture="COVID-Net: 7x7 stem + 4 stages of densely connected PEPX (3, 4, 6, 3), width multiplier",
        input_size=(1, 224, 224),
        recipes={
            "tartaglione2020": Recipe(
                head="covidnet",
                head_kwargs={"hidden": (1024, 256)},
                freeze_policy="none",
                notes=(
                    "Sec. 4.5, Table 2: COVID-Net trained on COVID-ChestXRay; Tartaglione et al. used Wang & "
                    "Wong's released model. Ours is a re-implementation from the paper (see module notes)."
                ),
            ),
        },
        default_recipe="tartaglione2020",
        references=("wang2020",),
        notes=(
            "Faithful in structure (PEPX = proj 1x1 -> exp 1x1 -> dw 3x3 -> proj 1x1 -> ext 1x1; long-range "
            "sums), approximate in widths, ratios, BatchNorm/ReLU placement; no torchvision weights; "
            "released models take 480 px."
        ),
    ),
)
def covidnet(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "covidnet",
    head_kwargs: dict[str, Any] | None = None,
    width_mult: float = 1.0,
    depths: tuple[int, ...] = _DEPTHS,
) -> CovidNetClassifier:
    """COVID-Net re-implementation; ``width_mult`` scales every width."""
    return CovidNetClassifier(num_classes, in_channels, head, head_kwargs, width_mult, depths)
