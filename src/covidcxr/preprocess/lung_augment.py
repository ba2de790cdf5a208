"""Augmentation for the lung U-Net: opacities pasted into the lungs, and what differs between sites.

Why: the shipped U-Net learned "lung = dark air". A consolidated lower zone is as white
as the diaphragm below it, so the network calls it "not lung" and masking then removes the
very pathology the classifier should read. Most training masks come from COVID figures,
but few show dense basal consolidation. Two remedies, both applied to the training batch
only (after the rigid transform, so image and mask stay aligned):

* `RandLungOpacityd` — **pathology-aware augmentation**: smooth, textured opacities are
  pasted *inside the reference lung mask* (biased towards the lower zones, where COVID-19
  and bacterial consolidation predominate; Wong et al. 2020, Radiology 296:E72) and the
  mask is left unchanged, so the network is taught that dense lung is still lung. Pasting
  synthetic lesions into healthy anatomy follows the lesion-pasting augmentation of
  Zhang et al. 2021 (CarveMix, MICCAI) and the synthetic-opacity training of
  Selvan et al. 2020 ("Lung segmentation from chest X-rays using variational data
  imputation", ICML workshop), who showed U-Nets fail on high-opacity COVID films.
* `site_transforms` — **site-imitating augmentation**: down-then-up sampling, JPEG,
  Poisson (quantum) noise and collimation borders, reusing the classifier's acquisition
  transforms (`covidcxr.train.augment`, one owner) so scanners the U-Net never saw look
  less new (domain randomisation; Tobin et al. 2017; Zhang et al. 2020, IEEE TMI 39:2531).

Shapes: every transform takes and returns a dict with ``image`` ``(1, S, S)`` float in
[0, 1] and ``label`` ``(C, S, S)`` float in {0, 1} (one channel per annotation
convention; an unannotated channel is all zero).

Example:
    >>> import torch
    >>> image = torch.full((1, 64, 64), 0.2); label = torch.zeros((2, 64, 64)); label[0, 10:60, 8:28] = 1
    >>> t = RandLungOpacityd(prob=1.0); _ = t.set_random_state(seed=0)
    >>> out = t({"image": image, "label": label})
    >>> bool(out["image"][0, 10:60, 8:28].mean() > 0.2), bool(torch.equal(out["label"], label))
    (True, True)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from scipy import ndimage


class RandLungOpacityd(RandomizableTransform, MapTransform):
    """Paste 1–3 smooth, textured opacities into the lungs; the lung mask is unchanged.

    Each opacity is a Gaussian blob (radius ``radius`` × the canvas side) centred on a
    random pixel of the union of the reference masks, drawn with weight rising towards
    the lung bases (``basal_bias``), multiplied by smooth noise (ground glass to
    consolidation texture) and clipped to the lungs. It pulls the pixels towards white:
    ``x + strength * blob * (1 - x)``. With ``strength`` near 1 the region becomes as
    white as soft tissue — the failure the U-Net must learn to resist.

    Hand-written: MONAI and TorchIO have no lesion-pasting transform for 2-D radiographs.

    Args:
        prob: probability of applying it to an image.
        count: (low, high) number of opacities, inclusive.
        radius: (low, high) blob radius as a fraction of the canvas side.
        strength: (low, high) how far the densest point moves towards white.
        basal_bias: exponent of the vertical weight (0: uniform over the lung; 2: mostly lower zones).
        keys: the image key; ``label_key`` names the mask key (read, never written).
    """

    def __init__(
        self,
        prob: float = 0.5,
        count: tuple[int, int] = (1, 3),
        radius: tuple[float, float] = (0.04, 0.14),
        strength: tuple[float, float] = (0.3, 0.95),
        basal_bias: float = 2.0,
        keys: str = "image",
        label_key: str = "label",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.count, self.radius, self.strength, self.basal_bias, self.label_key = count, radius, strength, basal_bias, label_key

    def _opacity(self, lungs: np.ndarray) -> np.ndarray:
        size = lungs.shape[0]
        rows, cols = np.nonzero(lungs)
        top, bottom = rows.min(), rows.max()
        height = (rows - top) / max(1, bottom - top)
        weights = (0.05 + height) ** self.basal_bias
        yy, xx = np.mgrid[0:size, 0:size]
        field = np.zeros(lungs.shape, np.float32)
        for _ in range(int(self.R.randint(self.count[0], self.count[1] + 1))):
            k = int(self.R.choice(len(rows), p=weights / weights.sum()))
            r = float(self.R.uniform(*self.radius)) * size
            aspect = float(self.R.uniform(0.6, 1.6))
            blob = np.exp(-(((yy - rows[k]) / (r * aspect)) ** 2 + ((xx - cols[k]) / r) ** 2))
            field = np.maximum(field, float(self.R.uniform(*self.strength)) * blob)
        texture = ndimage.gaussian_filter(self.R.standard_normal(lungs.shape).astype(np.float32), size / 64.0)
        texture = 0.75 + 0.25 * texture / (np.abs(texture).max() + 1e-6)
        # soft clip to the lungs: an opacity ends at the pleura, and a 1-px ramp avoids a printed edge
        inside = ndimage.gaussian_filter(lungs.astype(np.float32), 1.0)
        return np.clip(field * texture * inside, 0.0, 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize(None)
        lungs = np.asarray(torch.as_tensor(out[self.label_key]).amax(0) > 0.5)
        if not self._do_transform or not lungs.any():
            return out
        opacity = torch.from_numpy(self._opacity(lungs))
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key]).float()
            out[key] = (image + opacity[None] * (1.0 - image)).clamp(0.0, 1.0)
        return out


class RandCollimationd(RandomizableTransform, MapTransform):
    """Collimation borders: a band along 1–4 edges set to black or white, in image *and* mask.

    Films from other sites are collimated or cropped differently; a band may cover part of
    a lung, which is then invisible, so the mask is cleared there too.

    Args:
        prob: probability of applying it.
        width: (low, high) band width as a fraction of the side.
    """

    def __init__(self, prob: float = 0.2, width: tuple[float, float] = (0.02, 0.1), keys: tuple[str, str] = ("image", "label")) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.width = width

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        image, label = torch.as_tensor(out["image"]).clone(), torch.as_tensor(out["label"]).clone()
        size = image.shape[-1]
        value = float(self.R.choice([0.0, 1.0]))
        for edge in self.R.permutation(4)[: int(self.R.randint(1, 5))]:
            band = max(1, int(self.R.uniform(*self.width) * size))
            index = [slice(None)] * 3
            index[1 + edge % 2] = slice(0, band) if edge < 2 else slice(size - band, size)
            image[tuple(index)] = value
            label[tuple(index)] = 0.0
        out["image"], out["label"] = image, label
        return out


class ImageOnlyd(Randomizable, MapTransform):
    """Apply an array transform of `covidcxr.train.augment` to the ``image`` key of a dict, seeded by the pipeline."""

    def __init__(self, transform: RandomizableTransform, keys: str = "image") -> None:
        MapTransform.__init__(self, keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ImageOnlyd:
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the wrapped transform draws its own parameters
        return None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self.transform(out[key])
        return out


def site_transforms(prob: float = 0.25) -> list[Any]:
    """What differs between sites: resolution, JPEG, quantum noise, collimation (each with ``prob``).

    Blur, gamma, contrast and Gaussian noise are already in the base augmentation
    (`covidcxr.preprocess.lung_training.build_augmentation`).
    """
    from covidcxr.train.augment import RandDownUpSample, RandJPEG, RandPoissonNoise

    return [
        ImageOnlyd(RandDownUpSample(prob=prob, factor=(0.3, 0.9))),
        ImageOnlyd(RandJPEG(prob=prob, quality=(25, 90))),
        ImageOnlyd(RandPoissonNoise(prob=prob, counts=(300.0, 5000.0))),
        RandCollimationd(prob=prob),
    ]


__all__ = ["ImageOnlyd", "RandCollimationd", "RandLungOpacityd", "site_transforms"]
