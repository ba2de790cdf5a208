"""Acquisition randomization: simulate other scanners and digitisations on the fly (training only).

A classifier trained on a few hospitals learns their look — contrast, gamma, noise,
sharpness, compression, resolution — and that look is confounded with the label
(Tartaglione et al. 2020 §3.2; DeGrave et al. 2021, Nat Mach Intell 3:610, "AI for
radiographic COVID-19 detection selects shortcuts over signal"). Randomising the
acquisition during training makes the look uninformative: every training image is shown
as if from many scanners (the "domain randomization" of Tobin et al. 2017, IROS, applied
to radiography by Zhang et al. 2020, IEEE TMI 39:2531, "Generalizing deep learning for
medical image segmentation to unseen domains via deep stacked transformation": gamma,
contrast, blur/sharpness and noise stacked at random).

Only intensity and resolution change; the anatomy is never deformed or rescaled (elastic
deformation and scaling stay refused by the recipe, Tartaglione et al. §3.2): the
down-then-up sampling returns the same size, so a lung keeps its pixels.

MONAI transforms where MONAI has one (`RandAdjustContrast` for gamma,
`RandScaleIntensityFixedMean` + `RandShiftIntensity` for the contrast/window,
`RandGaussianSmooth`, `RandGaussianSharpen`, `RandGaussianNoise`); small
`RandomizableTransform` subclasses where it has none (Poisson noise, a Pillow JPEG
round-trip, down-then-up sampling, histogram equalisation on/off).

Example:
    >>> import torch
    >>> from covidcxr.train.recipe import AcquisitionSection
    >>> randomizer = AcquisitionRandomizer(AcquisitionSection(prob=1.0))
    >>> batch = torch.rand(2, 1, 64, 64)
    >>> out = randomizer(batch, seed=3)
    >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
    (torch.Size([2, 1, 64, 64]), True, True)
    >>> bool(torch.equal(out, randomizer(batch, seed=3)))
    True
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    HistogramNormalize,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSharpen,
    RandGaussianSmooth,
    RandomizableTransform,
    RandScaleIntensityFixedMean,
    RandShiftIntensity,
)

__all__ = ["AcquisitionRandomizer", "RandDownUpSample", "RandEqualize", "RandJPEG", "RandPoissonNoise", "acquisition_transforms"]


def _as_tensor(image: Any) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))


class RandPoissonNoise(RandomizableTransform):
    """Quantum (photon-count) noise: ``Poisson(x * counts) / counts`` with ``counts`` drawn per image.

    MONAI has Gaussian and Rician noise but no Poisson noise; a radiograph's detector
    noise is Poisson in the photon count (fewer counts: noisier, as a low-dose portable film).

    Args:
        prob: probability of applying it.
        counts: (low, high) photons at full intensity, drawn log-uniformly.

    Shapes: ``(C, H, W)`` in [0, 1] -> same shape, clipped to [0, 1].
    """

    def __init__(self, prob: float = 0.5, counts: tuple[float, float] = (200.0, 5000.0)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.counts = counts
        self._counts = float(counts[1])

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        low, high = np.log(self.counts[0]), np.log(self.counts[1])
        self._counts = float(np.exp(self.R.uniform(low, high)))

    def __call__(self, image: Any, randomize: bool = True) -> torch.Tensor:
        image = _as_tensor(image)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        lam = np.clip(image.detach().cpu().numpy().astype(np.float64), 0.0, 1.0) * self._counts
        noisy = self.R.poisson(lam) / self._counts
        return torch.as_tensor(np.clip(noisy, 0.0, 1.0), dtype=image.dtype, device=image.device)


class RandJPEG(RandomizableTransform):
    """Lossy JPEG compression (a Pillow round-trip through 8 bits) at a random quality.

    Films digitised or exported as JPEG carry block artefacts whose strength depends on
    the source (many public COVID images are web JPEGs); MONAI has no JPEG transform.

    Args:
        prob: probability of applying it.
        quality: (low, high) JPEG quality, drawn uniformly (integers).

    Shapes: ``(1, H, W)`` in [0, 1] -> same shape, in [0, 1] (multiples of 1/255).
    """

    def __init__(self, prob: float = 0.5, quality: tuple[int, int] = (30, 95)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.quality = quality
        self._quality = int(quality[1])

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._quality = int(self.R.randint(int(self.quality[0]), int(self.quality[1]) + 1))

    def __call__(self, image: Any, randomize: bool = True) -> torch.Tensor:
        from PIL import Image

        image = _as_tensor(image)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        array = image.detach().cpu().float().numpy()
        out = np.empty_like(array)
        for c in range(array.shape[0]):
            pixels = np.round(np.clip(array[c], 0.0, 1.0) * 255.0).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=self._quality)
            buffer.seek(0)
            out[c] = np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0
        return torch.as_tensor(out, dtype=image.dtype, device=image.device)


class RandDownUpSample(RandomizableTransform):
    """Lose resolution: downsample by a random factor (area), then upsample back (bilinear) to the same size.

    Simulates a lower-resolution detector or a small digitised copy. The output has the
    input's size, so the anatomy is not rescaled (no zoom). MONAI's ``RandZoom`` changes
    the field of view, which is what this must not do.

    Args:
        prob: probability of applying it.
        factor: (low, high) ratio of the intermediate size to the input size, in (0, 1].

    Shapes: ``(C, H, W)`` -> ``(C, H, W)``.
    """

    def __init__(self, prob: float = 0.5, factor: tuple[float, float] = (0.35, 1.0)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.factor = factor
        self._factor = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._factor = float(self.R.uniform(self.factor[0], self.factor[1]))

    def __call__(self, image: Any, randomize: bool = True) -> torch.Tensor:
        image = _as_tensor(image)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        height, width = image.shape[-2:]
        small = (max(2, round(height * self._factor)), max(2, round(width * self._factor)))
        x = image[None].float()
        x = F.interpolate(x, size=small, mode="area")
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return x[0].clamp(0.0, 1.0).to(image.dtype)


class RandEqualize(RandomizableTransform):
    """Histogram equalisation on or off at random (MONAI's `HistogramNormalize` when on).

    Sources differ in whether their films were equalised before export; equalising some
    training images at random makes that difference uninformative.

    Shapes: ``(C, H, W)`` in [0, 1] -> same shape, in [0, 1].
    """

    def __init__(self, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        self.equalize = HistogramNormalize(num_bins=256, min=0, max=1)

    def __call__(self, image: Any, randomize: bool = True) -> torch.Tensor:
        image = _as_tensor(image)
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return image
        out = _as_tensor(self.equalize(image.float()))
        return out.clamp(0.0, 1.0).to(image.dtype)


def acquisition_transforms(spec: Any) -> list[Any]:
    """The randomizing transforms a recipe's ``augmentation.acquisition`` section asks for, in order.

    Order: the scanner's physics first (resolution, unsharpness, noise), then the display
    (gamma, contrast/window, sharpening, equalisation), then the export (JPEG) — the order
    an image goes through from detector to file.

    Args:
        spec: an `covidcxr.train.recipe.AcquisitionSection`.

    Returns:
        MONAI transforms (each with ``prob`` = ``spec.prob``) for ``(C, H, W)`` tensors.
    """
    p = spec.prob
    out: list[Any] = []
    if spec.downsample is not None:
        out.append(RandDownUpSample(prob=p, factor=tuple(spec.downsample)))
    if spec.blur_sigma is not None:
        out.append(RandGaussianSmooth(sigma_x=tuple(spec.blur_sigma), sigma_y=tuple(spec.blur_sigma), prob=p))
    if spec.gaussian_noise is not None:
        out.append(RandGaussianNoise(prob=p, mean=0.0, std=float(spec.gaussian_noise), sample_std=True))
    if spec.poisson_counts is not None:
        out.append(RandPoissonNoise(prob=p, counts=tuple(spec.poisson_counts)))
    if spec.gamma is not None:
        out.append(RandAdjustContrast(prob=p, gamma=tuple(spec.gamma)))
    if spec.contrast is not None:
        low, high = spec.contrast
        out.append(RandScaleIntensityFixedMean(prob=p, factors=(low - 1.0, high - 1.0), fixed_mean=True))
    if spec.brightness is not None:
        out.append(RandShiftIntensity(offsets=float(spec.brightness), prob=p))
    if spec.sharpen:
        out.append(RandGaussianSharpen(prob=p))
    if spec.equalize > 0:
        out.append(RandEqualize(prob=spec.equalize))
    if spec.jpeg_quality is not None:
        out.append(RandJPEG(prob=p, quality=tuple(spec.jpeg_quality)))
    return out


class AcquisitionRandomizer:
    """Apply a recipe's acquisition randomization to a training batch, reproducibly.

    Each image gets its own draw; the draws are fixed by ``seed`` (the training module
    seeds it with (recipe seed, epoch, batch, rank), so a resumed run draws the same).
    The images are clipped to [0, 1] after every step that could leave it.

    Args:
        spec: an `covidcxr.train.recipe.AcquisitionSection`.

    Example:
        See the module docstring.
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.transforms = acquisition_transforms(spec)
        self.compose = Compose(self.transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        """``(B, C, H, W)`` float in [0, 1] -> the randomised batch, same shape, device and dtype."""
        if not self.transforms:
            return batch
        self.compose.set_random_state(seed=int(seed) % (2**32 - 1))
        device, dtype = batch.device, batch.dtype
        cpu = batch.detach().float().cpu()
        out = torch.empty_like(cpu)
        for i in range(cpu.shape[0]):
            image = cpu[i]
            for transform in self.transforms:
                image = _as_tensor(transform(image)).float().clamp(0.0, 1.0)
            out[i] = image
        return out.to(device=device, dtype=dtype)
