"""Montgomery County (Maryland, USA) tuberculosis chest X-rays (NLM).

138 PA chest X-rays (80 normal, 58 tuberculosis) with manual lung masks, one per lung:
``CXR_png/MCUCXR_0001_0.png``, ``ManualMask/leftMask/MCUCXR_0001_0.png``,
``ManualMask/rightMask/MCUCXR_0001_0.png``, ``ClinicalReadings/MCUCXR_0001_0.txt``
(``Patient's Sex: M``, ``Patient's Age: 044Y``, then the reading). Shared logic and
labels: `covidcxr.data.sources.nlm_tb`.

The manifest has one mask file per image, so the adapter merges the two lung masks
(union) into one PNG. Adapters never write into the repository or next to other data
than the source's own: the merged masks go to ``<root>/.covidcxr/merged_masks/`` when the
root is writable, else to ``$XDG_CACHE_HOME`` (default ``~/.cache``)
``/covidcxr/montgomery_masks/<hash of root>/``. Writes are atomic and a merged mask newer
than both halves is reused. This is the only adapter that reads pixels.

Citation:
    Stefan Jaeger, Sema Candemir, Sameer Antani, Yi-Xiang J. Wang, Pu-Xuan Lu, George Thoma.
    Two public chest X-ray datasets for computer-aided screening of pulmonary diseases.
    Quantitative Imaging in Medicine and Surgery 4(6):475-477, 2014. Masks: Candemir S,
    et al. Lung segmentation in chest radiographs using anatomical atlases with nonrigid
    registration. IEEE Transactions on Medical Imaging 33(2):577-590, 2014.

Download:
    https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.data.sources._common import ManifestBuilder
from covidcxr.data.sources.base import SourceTable, register_source
from covidcxr.data.sources.nlm_tb import NLM_CITATION, NLM_URL, NLMTuberculosisSource
from covidcxr.io import write_png

_SEX = re.compile(r"Patient'?s\s+Sex\s*:\s*(\S+)", re.IGNORECASE)
_AGE = re.compile(r"Patient'?s\s+Age\s*:\s*(\S+)", re.IGNORECASE)


def merged_mask_dir(root: Path) -> Path:
    """Where the merged Montgomery masks of ``root`` go: inside it if writable, else the user cache."""
    preferred = root / ".covidcxr" / "merged_masks"
    if _writable(preferred):
        return preferred
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # One folder per dataset copy, named by its absolute path.
    return cache / "covidcxr" / "montgomery_masks" / hashlib.sha1(str(root).encode()).hexdigest()[:16]


def _binary(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


@register_source
class MontgomerySource(NLMTuberculosisSource):
    """Montgomery County TB set: left and right lung masks merged into one cached mask.

    An image with only one lung mask, or with halves of different sizes, keeps no mask
    and the problem is reported as a `Rejection` (the image itself is still loaded).
    """

    name = "montgomery"
    description = (
        "NLM Montgomery County TB set: CXR_png/MCUCXR_*.png + ManualMask/{left,right}Mask/ + ClinicalReadings/"
    )
    citation = NLM_CITATION + "; masks: Candemir S, et al. IEEE Trans Med Imaging 33(2):577-590, 2014"
    url = NLM_URL
    prefix = "MCUCXR"

    def __init__(self) -> None:
        self._mask_dir: Path | None = None

    def load(self, root: Path) -> SourceTable:
        # The cache folder is chosen per root, on the first mask that needs merging.
        self._mask_dir = None
        return super().load(root)

    @staticmethod
    def parse_reading(text: str) -> tuple[str | None, str | None, str]:
        sex, age = _SEX.search(text), _AGE.search(text)
        rest = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not _SEX.search(line) and not _AGE.search(line)
        ]
        return (sex.group(1) if sex else None, age.group(1) if age else None, " ".join(rest))

    def mask_for(self, root: Path, stem: str, out: ManifestBuilder) -> Path | None:
        halves = [root / "ManualMask" / side / f"{stem}.png" for side in ("leftMask", "rightMask")]
        present = [half for half in halves if half.is_file()]
        if not present:
            return None
        if len(present) == 1:
            out.reject(present[0], f"only one lung mask of {stem} exists; image kept without a mask")
            return None
        if self._mask_dir is None:
            self._mask_dir = merged_mask_dir(root)
        target = self._mask_dir / f"{stem}.png"
        if target.is_file() and target.stat().st_mtime >= max(half.stat().st_mtime for half in halves):
            return target
        try:
            left, right = (_binary(half) for half in halves)
            if left.shape != right.shape:
                out.reject(
                    halves[1], f"right mask is {right.shape}, left {left.shape}; image {stem} kept without a mask"
                )
                return None
            write_png(target, left | right)
        except OSError as error:
            out.reject(
                halves[0], f"could not merge the lung masks of {stem} into {target} ({error}); image kept without a mask"
            )
            return None
        return target
