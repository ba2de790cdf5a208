"""Actualmed COVID-19 chest X-ray collection (COVID-Net team): ``metadata.csv`` + ``images/``.

Chest X-rays (PNG, from a Spanish radiology provider) of COVID-19 positive, negative and
inconclusive cases; ``metadata.csv`` names each image in its ``imagename`` column and the
patient in ``patientid`` (``ANON196``). Shared logic and label mapping:
`covidcxr.data.sources.agchung`.

Citation:
    Linda Wang, Zhong Qiu Lin, Alexander Wong. COVID-Net: a tailored deep convolutional
    neural network design for detection of COVID-19 cases from chest X-ray images.
    Scientific Reports 10, 19549 (2020). doi:10.1038/s41598-020-76550-z

Download:
    https://github.com/agchung/Actualmed-COVID-chestxray-dataset
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import cell
from covidcxr.data.sources.agchung import COVIDNET_CITATION, AgchungSource
from covidcxr.data.sources.base import register_source


@register_source
class ActualmedSource(AgchungSource):
    """Actualmed-COVID-chestxray-dataset: rows name their image in ``imagename``.

    Blank findings (the source's "Inconclusive" notes) become label other with finding
    ``unconfirmed (finding blank in source)``; rows whose image is absent are rejected.
    """

    name = "actualmed"
    description = "Actualmed COVID-19 chest X-rays: metadata.csv (imagename column) + images/"
    citation = COVIDNET_CITATION
    url = "https://github.com/agchung/Actualmed-COVID-chestxray-dataset"
    image_columns = ("imagename",)

    @classmethod
    def detect(cls, root: Path) -> bool:
        header = cls._has_layout(root)
        return header is not None and "imagename" in header

    def image_path(self, root: Path, row: pd.Series) -> Path | None:
        name = cell(row, "imagename")
        return None if name is None else root / "images" / name

    def patient_of(self, raw_id: str) -> str:
        return raw_id
