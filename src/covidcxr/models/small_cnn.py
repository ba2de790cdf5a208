"""``small_cnn``: an approximation of Hall et al. 2020's "own small CNN".

Hall et al. (Sec. 3) add to their ensemble "a small CNN trained just on this data that we
have used before [10]" (Paul et al., IJCNN 2018, CNN ensembles for lung-nodule
malignancy on CT). Neither paper here describes it, so this is our design, in the spirit
of those small CNNs trained from scratch on a few hundred images:

four blocks of conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool, widths 32, 64, 128, 256,
the first convolution with stride 2 so that a 224 px input gives a 7x7 map like the
ImageNet backbones (Grad-CAM maps of all models are then comparable), followed by the
Hall head (GAP -> FC64 -> ReLU -> Dropout -> FC). About 0.39 M backbone parameters: 30x
fewer than ResNet-18, appropriate to a dataset of ~200 training images.

Stages: one per block (4).

Example:
    >>> model = create_model("small_cnn")
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 256, 7, 7])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["SmallCNNClassifier", "small_cnn"]


class SmallCNNClassifier(CXRClassifier):
    """A small from-scratch CNN as a `CXRClassifier`.

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module (default recipe: ``hall``).
        head_kwargs: head builder arguments.
        widths: channels of the blocks (default 32, 64, 128, 256).
        first_stride: stride of the first convolution (2: 224 px -> 7x7 map).

    Shapes:
        (B, in_channels, H, W) -> features (B, widths[-1], H/32, W/32) -> logits.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "hall",
        head_kwargs: dict[str, Any] | None = None,
        widths: Sequence[int] = (32, 64, 128, 256),
        first_stride: int = 2,
    ) -> None:
        super().__init__(num_classes, in_channels)
        if not widths:
            raise CovidCXRError("small_cnn needs at least one block width")
        stages = []
        previous = in_channels
        for i, width in enumerate(widths):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, 3, stride=first_stride if i == 0 else 1, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            previous = width
        self.stages = nn.ModuleList(stages)
        self.num_features = previous
        self.init_stage_weights()
        self.init_head(head, head_kwargs)


@register_model(
    "small_cnn",
    ModelCfg(
        architecture="small CNN: 4 x (conv 3x3 -> BN -> ReLU -> max-pool 2), widths 32-256 (our design)",
        input_size=(1, 224, 224),
        recipes={
            "hall2020": Recipe(
                head="hall",
                head_kwargs={"hidden": 64, "dropout": 0.5},
                freeze_policy="none",
                notes=(
                    "Sec. 3: 'a small CNN ... that we have used before [10]', trained from scratch and "
                    "snapshot-ensembled with ResNet50 and VGG16. Not described: this is an approximation."
                ),
            ),
        },
        default_recipe="hall2020",
        notes="APPROXIMATION: Hall et al.'s small CNN is not described in the paper; see the module docstring.",
    ),
)
def small_cnn(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "hall",
    head_kwargs: dict[str, Any] | None = None,
    widths: Sequence[int] = (32, 64, 128, 256),
    first_stride: int = 2,
) -> SmallCNNClassifier:
    """Small from-scratch CNN (approximation of Hall et al.'s)."""
    return SmallCNNClassifier(num_classes, in_channels, head, head_kwargs, widths, first_stride)
