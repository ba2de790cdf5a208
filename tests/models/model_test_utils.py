"""Helpers of the model tests: torchvision-named fake state dicts, written from torchvision's
naming independently of covidcxr's mapping code, and a one-thread fixture.

The fake state dicts have torchvision's exact keys and shapes (3-channel input, 1000-class
classifier) and random values, so a test can check that every tensor lands where it should.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: with the machine's 2 cores shared with a training job, OpenMP's
    2-thread barriers make small convolutions 10-20x slower than a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _Builder:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.state: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    # Random but well scaled (unit-variance activations), so networks built from these
    # weights can also be compared numerically.
    def conv(self, name: str, out: int, inp: int, k: int, bias: bool = False) -> None:
        self.state[f"{name}.weight"] = self.randn(out, inp, k, k) / (inp * k * k) ** 0.5
        if bias:
            self.state[f"{name}.bias"] = 0.1 * self.randn(out)

    def bn(self, name: str, channels: int) -> None:
        self.state[f"{name}.weight"] = 1.0 + 0.1 * self.randn(channels)
        self.state[f"{name}.bias"] = 0.1 * self.randn(channels)
        self.state[f"{name}.running_mean"] = 0.1 * self.randn(channels)
        self.state[f"{name}.running_var"] = 1.0 + 0.1 * self.randn(channels).abs()
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(100)

    def linear(self, name: str, out: int, inp: int) -> None:
        # classifiers are never loaded: zeros (lazily allocated) keep VGG's 102M-entry fc cheap
        self.state[f"{name}.weight"] = torch.zeros(out, inp)
        self.state[f"{name}.bias"] = torch.zeros(out)


def torchvision_resnet(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ``resnet18`` / ``resnet50`` state dict (keys and shapes)."""
    b = _Builder(seed)
    bottleneck = depth == 50
    repeats = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    b.conv("conv1", 64, 3, 7)
    b.bn("bn1", 64)
    inplanes = 64
    for layer, (planes, n) in enumerate(zip((64, 128, 256, 512), repeats, strict=True), start=1):
        for block in range(n):
            stride = 2 if block == 0 and layer > 1 else 1
            p = f"layer{layer}.{block}"
            if bottleneck:
                out = planes * 4
                b.conv(f"{p}.conv1", planes, inplanes, 1)
                b.bn(f"{p}.bn1", planes)
                b.conv(f"{p}.conv2", planes, planes, 3)
                b.bn(f"{p}.bn2", planes)
                b.conv(f"{p}.conv3", out, planes, 1)
                b.bn(f"{p}.bn3", out)
            else:
                out = planes
                b.conv(f"{p}.conv1", planes, inplanes, 3)
                b.bn(f"{p}.bn1", planes)
                b.conv(f"{p}.conv2", planes, planes, 3)
                b.bn(f"{p}.bn2", planes)
            if block == 0 and (stride != 1 or inplanes != out):
                b.conv(f"{p}.downsample.0", out, inplanes, 1)
                b.bn(f"{p}.downsample.1", out)
            inplanes = out
    b.linear("fc", 1000, inplanes)
    return b.state


def torchvision_vgg(depth: int, batch_norm: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ``vgg16``/``vgg19`` (``_bn``) state dict."""
    cfg = {
        16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
        19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    }[depth]
    b = _Builder(seed)
    index, channels = 0, 3
    for v in cfg:
        if v == "M":
            index += 1
            continue
        b.conv(f"features.{index}", v, channels, 3, bias=True)
        if batch_norm:
            b.bn(f"features.{index + 1}", v)
            index += 3
        else:
            index += 2
        channels = v
    b.linear("classifier.0", 4096, 512 * 7 * 7)
    b.linear("classifier.3", 4096, 4096)
    b.linear("classifier.6", 1000, 4096)
    return b.state


def torchvision_densenet121(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ``densenet121`` state dict (current naming: ``denselayer1.norm1``)."""
    b = _Builder(seed)
    b.conv("features.conv0", 64, 3, 7)
    b.bn("features.norm0", 64)
    channels = 64
    for block, n in enumerate((6, 12, 24, 16), start=1):
        for layer in range(1, n + 1):
            p = f"features.denseblock{block}.denselayer{layer}"
            b.bn(f"{p}.norm1", channels)
            b.conv(f"{p}.conv1", 128, channels, 1)
            b.bn(f"{p}.norm2", 128)
            b.conv(f"{p}.conv2", 32, 128, 3)
            channels += 32
        if block < 4:
            b.bn(f"features.transition{block}.norm", channels)
            b.conv(f"features.transition{block}.conv", channels // 2, channels, 1)
            channels //= 2
    b.bn("features.norm5", channels)
    b.linear("classifier", 1000, channels)
    return b.state


def torchvision_mobilenet_v2(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ``mobilenet_v2`` state dict."""
    b = _Builder(seed)
    b.conv("features.0.0", 32, 3, 3)
    b.bn("features.0.1", 32)
    index, channels = 1, 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(n):
            p = f"features.{index}.conv"
            hidden = channels * t
            j = 0
            if t != 1:
                b.conv(f"{p}.0.0", hidden, channels, 1)
                b.bn(f"{p}.0.1", hidden)
                j = 1
            b.conv(f"{p}.{j}.0", hidden, 1, 3)  # depthwise: (hidden, 1, 3, 3)
            b.bn(f"{p}.{j}.1", hidden)
            b.conv(f"{p}.{j + 1}", c, hidden, 1)
            b.bn(f"{p}.{j + 2}", c)
            channels = c
            index += 1
    b.conv("features.18.0", 1280, 320, 1)
    b.bn("features.18.1", 1280)
    b.linear("classifier.1", 1000, 1280)
    return b.state


TORCHVISION_STATE_DICTS = {
    "resnet18": lambda: torchvision_resnet(18),
    "resnet50": lambda: torchvision_resnet(50),
    "vgg16": lambda: torchvision_vgg(16),
    "vgg19": lambda: torchvision_vgg(19),
    "densenet121": torchvision_densenet121,
    "mobilenet_v2": torchvision_mobilenet_v2,
}
