"""Conv8 (Tartaglione et al. 2020, Sec. 4.4): 8 convolutional layers and one FC layer.

The paper: "a smaller artificial neural network, made of 8 convolutional layers and a
final fully-connected layer, which takes inspiration from the ALL-CNN-C architecture"
(Springenberg et al. 2015, whose idea is to downsample with strided convolutions instead
of pooling). Their released code has exactly such a network (``LeNet1024NoPoolingDeep``
in ``models/covid_classifier.py``): eight 3x3 convolutions without bias, each followed by
BatchNorm and ReLU, the first with stride 1 and the other seven with stride 2, 8 channels
throughout, then one linear layer on the flattened 6x6 map of a 1024 px input.

Ours follows that code with two changes so it runs at the sizes this toolkit uses:

* padding 1 (theirs: none, which needs inputs of at least ~380 px): a 224 px input gives
  a 2x2 map, 64 px gives 1x1;
* the FC reads the global-average-pooled vector (the ``linear`` head) rather than the
  flattened map; ``head_kwargs={"pool": "flatten", "feature_hw": (h, w)}`` restores that
  for a fixed input size.

``width`` (8 in the authors' code) sets every layer's channels; ``channels`` gives them
one by one (e.g. ALL-CNN-C-like ``(96, 96, 96, 192, 192, 192, 192, 192)``).

Stages: each convolution block (conv -> BN -> ReLU) is one stage, 8 in all.

Example:
    >>> model = create_model("conv8")
    >>> model.forward_features(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 8, 2, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models.base import CXRClassifier
from covidcxr.models.registry import ModelCfg, Recipe, register_model

__all__ = ["Conv8Classifier", "conv8"]

_STRIDES = (1, 2, 2, 2, 2, 2, 2, 2)


class Conv8Classifier(CXRClassifier):
    """Conv8 as a `CXRClassifier`.

    Args:
        num_classes: number of logits.
        in_channels: input channels (1 = grayscale).
        head: head name or module (``linear`` = the paper's single FC layer).
        head_kwargs: head builder arguments.
        width: channels of every convolution (authors' code: 8).
        channels: per-layer channels (8 values), overriding ``width``.
        strides: per-layer strides (authors' code: 1, then 2 seven times).

    Shapes:
        (B, in_channels, H, W) -> features (B, channels[-1], ~H/128, ~W/128) -> logits.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        head: str | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
        width: int = 8,
        channels: Sequence[int] | None = None,
        strides: Sequence[int] = _STRIDES,
    ) -> None:
        super().__init__(num_classes, in_channels)
        channels = tuple(channels) if channels is not None else (width,) * 8
        if len(channels) != 8 or len(strides) != 8:
            raise CovidCXRError(f"conv8 needs 8 channel counts and 8 strides, got {len(channels)} and {len(strides)}")
        stages = []
        previous = in_channels
        for out, stride in zip(channels, strides, strict=True):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(previous, out, kernel_size=3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            previous = out
        self.stages = nn.ModuleList(stages)
        self.num_features = previous
        self.init_stage_weights()
        self.init_head(head, head_kwargs)


@register_model(
    "conv8",
    ModelCfg(
        architecture="Conv8: 8 x (conv 3x3 -> BN -> ReLU), strides 1,2,2,2,2,2,2,2, width 8, + one FC",
        input_size=(1, 224, 224),
        recipes={
            "tartaglione2020": Recipe(
                head="linear",
                freeze_policy="none",
                notes=(
                    "Sec. 4.4: 8 conv + 1 FC inspired by ALL-CNN-C, trained from scratch; BA 0.61 on CORDA. "
                    "Architecture from the released code (LeNet1024NoPoolingDeep), padded and GAP-pooled here."
                ),
            ),
        },
        default_recipe="tartaglione2020",
        references=("springenberg2015",),
        notes="Authors' code ran it on 1024 px without padding; ours pads so any size >= 1 px works.",
    ),
)
def conv8(
    num_classes: int = 1,
    in_channels: int = 1,
    head: str | nn.Module = "linear",
    head_kwargs: dict[str, Any] | None = None,
    width: int = 8,
    channels: Sequence[int] | None = None,
    strides: Sequence[int] = _STRIDES,
) -> Conv8Classifier:
    """Conv8: 4,232 backbone parameters at width 8 (1 input channel)."""
    return Conv8Classifier(num_classes, in_channels, head, head_kwargs, width, channels, strides)
