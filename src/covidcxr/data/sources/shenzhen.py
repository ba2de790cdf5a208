"""Shenzhen No.3 People's Hospital (China) tuberculosis chest X-rays (NLM).

662 PA chest X-rays (326 normal, 336 tuberculosis): ``CXR_png/CHNCXR_0001_0.png`` and
``ClinicalReadings/CHNCXR_0001_0.txt`` (first line ``male 45yrs``, then the reading).
Lung masks, drawn later for a subset, are read from ``mask/CHNCXR_0001_0_mask.png`` (also
accepted: ``masks/`` and names without ``_mask``). Shared logic and labels:
`covidcxr.data.sources.nlm_tb`.

Citation:
    Stefan Jaeger, Sema Candemir, Sameer Antani, Yi-Xiang J. Wang, Pu-Xuan Lu, George Thoma.
    Two public chest X-ray datasets for computer-aided screening of pulmonary diseases.
    Quantitative Imaging in Medicine and Surgery 4(6):475-477, 2014. Masks: Stirenko S, et
    al. Chest X-Ray Analysis of Tuberculosis by Deep Learning with Segmentation and
    Augmentation. IEEE ELNANO 2018, 422-428.

Download:
    https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
    (masks: https://www.kaggle.com/datasets/yoctoman/shcxr-lung-mask)
"""

from __future__ import annotations

import re
from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder
from covidcxr.data.sources.base import register_source
from covidcxr.data.sources.nlm_tb import NLM_CITATION, NLM_URL, NLMTuberculosisSource

# "male 45yrs", "Female 38 yrs", "male 8month"; "female" first, since it contains "male".
_SEX_AGE = re.compile(r"\b(female|male)\b\W*(\d+(?:\.\d+)?)\s*(years?|yrs?|y|months?|month|m|days?|d)?", re.IGNORECASE)
_UNIT = {"m": "M", "d": "D"}


@register_source
class ShenzhenSource(NLMTuberculosisSource):
    """Shenzhen TB set: images, clinical readings and, for a subset, lung masks."""

    name = "shenzhen"
    description = "NLM Shenzhen TB set: CXR_png/CHNCXR_*.png + ClinicalReadings/ (+ mask/*_mask.png for a subset)"
    citation = NLM_CITATION + "; masks: Stirenko S, et al. IEEE ELNANO 2018, 422-428"
    url = NLM_URL
    prefix = "CHNCXR"

    @staticmethod
    def parse_reading(text: str) -> tuple[str | None, str | None, str]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return None, None, ""
        match = _SEX_AGE.search(lines[0])
        if match is None:
            return None, None, " ".join(lines)
        sex, number, unit = match.groups()
        # DICOM-style age text ("8M" = months) for normalize_age; years when no unit.
        age = number + _UNIT.get((unit or "y")[0].lower(), "Y")
        return sex, age, " ".join(lines[1:])

    def mask_for(self, root: Path, stem: str, out: ManifestBuilder) -> Path | None:
        for folder in ("mask", "masks"):
            for name in (f"{stem}_mask.png", f"{stem}.png"):
                if (root / folder / name).is_file():
                    return root / folder / name
        return None
