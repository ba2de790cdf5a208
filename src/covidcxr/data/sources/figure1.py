"""Figure1 COVID-19 chest X-ray collection (COVID-Net team): ``metadata.csv`` + ``images/``.

Chest X-rays contributed through the Figure 1 clinical case app. ``metadata.csv`` has no
file-name column: the image of row ``COVID-00003a`` is ``images/COVID-00003a.jpg`` (or
``.png``). A trailing letter marks several images of one case (``COVID-00003a``,
``COVID-00003b``), so the patient id is the id without it (``COVID-00003``). The CSV is
Latin-1 encoded. Shared logic and label mapping: `covidcxr.data.sources.agchung`.

Citation:
    Linda Wang, Zhong Qiu Lin, Alexander Wong. COVID-Net: a tailored deep convolutional
    neural network design for detection of COVID-19 cases from chest X-ray images.
    Scientific Reports 10, 19549 (2020). doi:10.1038/s41598-020-76550-z

Download:
    https://github.com/agchung/Figure1-COVID-chestxray-dataset
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import cell
from covidcxr.data.sources.agchung import COVIDNET_CITATION, AgchungSource
from covidcxr.data.sources.base import register_source

_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
_CASE_SUFFIX = re.compile(r"(?<=\d)[a-z]$")


@register_source
class Figure1Source(AgchungSource):
    """Figure1-COVID-chestxray-dataset: images named after the row's ``patientid``.

    Blank findings become label other with finding ``unconfirmed (finding blank in
    source)``; ``AP erect`` is AP; rows whose image is absent are rejected.
    """

    name = "figure1"
    description = "Figure1 COVID-19 chest X-rays: metadata.csv (no file-name column) + images/<patientid>.jpg"
    citation = COVIDNET_CITATION
    url = "https://github.com/agchung/Figure1-COVID-chestxray-dataset"

    @classmethod
    def detect(cls, root: Path) -> bool:
        header = cls._has_layout(root)
        # Cohen and Actualmed name their files in a column; Figure1 does not.
        return header is not None and "imagename" not in header and "filename" not in header

    def image_path(self, root: Path, row: pd.Series) -> Path | None:
        raw_id = cell(row, "patientid")
        if raw_id is None:
            return None
        candidates = [root / "images" / f"{raw_id}{suffix}" for suffix in _IMAGE_SUFFIXES]
        # The first candidate stands for the row in the rejection when none exists.
        return next((path for path in candidates if path.is_file()), candidates[0])

    def patient_of(self, raw_id: str) -> str:
        return _CASE_SUFFIX.sub("", raw_id)
