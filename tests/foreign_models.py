"""Foreign classifiers built with plain torch only (no covidcxr code), exported to ONNX or TorchScript.

Hand-constructed weights, so they are deterministic and their behaviour is known:

* `CornerReader` scores the mean brightness of the top-right corner of a 64 x 64 input —
  where the phantoms' burned-in text marker sits (`covidcxr.data.synth.ShortcutSpec`): a
  model that learned the marker shortcut;
* `LungReader` scores the mean brightness of two patches inside the lower lung fields —
  where the phantoms' COVID opacities lie: a model that reads the lungs.

Each is a 64 x 64 convolution (one kernel covering the whole input) whose weights are the
region's indicator divided by its area, then ``sigmoid(gain * (mean - offset))``; both
return ``(probability (N, 1), embedding (N, 2))`` — the embedding being the corner and
lung means.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

SIZE = 64


def _region(rows: tuple[int, int], *column_ranges: tuple[int, int]) -> torch.Tensor:
    region = torch.zeros(SIZE, SIZE)
    for c0, c1 in column_ranges:
        region[rows[0] : rows[1], c0:c1] = 1.0
    return region / region.sum()


CORNER = _region((0, 11), (40, 64))
LOWER_LUNGS = _region((26, 38), (14, 24), (40, 50))


class RegionReader(torch.nn.Module):
    """``(N, 1, 64, 64)`` -> ``(sigmoid(gain * (mean over the scored region - offset)) (N, 1), [corner mean, lung mean] (N, 2))``."""

    def __init__(self, scored: torch.Tensor, gain: float, offset: float):
        super().__init__()
        self.means = torch.nn.Conv2d(1, 2, kernel_size=SIZE, bias=False)
        with torch.no_grad():
            self.means.weight.copy_(torch.stack([CORNER, LOWER_LUNGS])[:, None])
        self.which = 0 if scored is CORNER else 1
        self.gain, self.offset = gain, offset

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = self.means(x).flatten(1)
        return torch.sigmoid(self.gain * (means[:, self.which : self.which + 1] - self.offset)), means


def corner_reader() -> RegionReader:
    return RegionReader(CORNER, gain=20.0, offset=0.3).eval()


def lung_reader() -> RegionReader:
    return RegionReader(LOWER_LUNGS, gain=20.0, offset=0.5).eval()


class LogitOnly(torch.nn.Module):
    """The same reader returning one logit tensor (no embedding) — for the `kind: logit` path."""

    def __init__(self, reader: RegionReader):
        super().__init__()
        self.reader = reader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = self.reader.means(x).flatten(1)
        return self.reader.gain * (means[:, self.reader.which : self.reader.which + 1] - self.reader.offset)


def export_onnx(module: torch.nn.Module, path: Path, outputs: tuple[str, ...] = ("probability", "embedding")) -> Path:
    """``torch.onnx.export`` (the TorchScript-based exporter: fast, no onnxscript) with a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros(2, 1, SIZE, SIZE),), str(path), input_names=["image"], output_names=list(outputs),
            dynamic_axes={"image": {0: "n"}, **{name: {0: "n"} for name in outputs}}, dynamo=False,
        )
    return path


def export_torchscript(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: torch.jit is deprecated, still the TorchScript writer
        torch.jit.trace(module, torch.zeros(2, 1, SIZE, SIZE)).save(str(path))
    return path
