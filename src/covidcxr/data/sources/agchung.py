"""What the two agchung/ COVID-Net collections share: ``metadata.csv`` + ``images/``.

The Actualmed and Figure1 COVID-19 chest X-ray collections were published together by
the COVID-Net team (agchung/ on GitHub) with nearly the same ``metadata.csv`` (columns
``patientid, offset, sex, age, finding, survival, temperature, pO2 saturation, view,
modality, ...``). They differ only in how a row names its image (Actualmed: an
``imagename`` column; Figure1: ``<patientid>.jpg`` or ``.png``) and in what a patient id
is. `AgchungSource` holds the shared logic; `covidcxr.data.sources.actualmed` and
`covidcxr.data.sources.figure1` are the registered adapters.

Citation:
    Linda Wang, Zhong Qiu Lin, Alexander Wong. COVID-Net: a tailored deep convolutional
    neural network design for detection of COVID-19 cases from chest X-ray images.
    Scientific Reports 10, 19549 (2020). doi:10.1038/s41598-020-76550-z

Download:
    https://github.com/agchung (Actualmed-COVID-chestxray-dataset, Figure1-COVID-chestxray-dataset)

Labels from ``finding`` (first item when comma-separated), with Cohen's mapping
(`covidcxr.data.sources.cohen.cohen_label`): ``COVID-19`` -> covid, ``No finding`` ->
normal, ``Pneumonia`` -> pneumonia. A blank finding (the source's "inconclusive" cases)
-> other, with finding ``unconfirmed (finding blank in source)``. Inclusion criteria:
X-ray modality (when the column is given) and a non-lateral view; ``AP erect`` is AP.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import pandas as pd

from covidcxr.data.manifest import normalize_view
from covidcxr.data.sources._common import ManifestBuilder, cell, csv_header, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable
from covidcxr.data.sources.cohen import cohen_label

COVIDNET_CITATION = (
    "Wang L, Lin ZQ, Wong A. COVID-Net: a tailored deep convolutional neural network design for "
    "detection of COVID-19 cases from chest X-ray images. Scientific Reports 10, 19549 (2020). "
    "doi:10.1038/s41598-020-76550-z"
)
BLANK_FINDING = "unconfirmed (finding blank in source)"


class AgchungSource(Source):
    """Base of the agchung/ collections: ``metadata.csv`` rows -> manifest rows.

    Subclasses set `name`, `description`, `citation`, `url`, `image_columns` (the columns
    their CSV must have besides the shared ones) and implement `image_path` and
    `patient_of`, and `detect`.
    """

    shared_columns: ClassVar[tuple[str, ...]] = ("patientid", "finding", "view")
    image_columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _has_layout(cls, root: Path) -> list[str] | None:
        """The metadata.csv header if ``root`` has ``images/`` and the shared columns, else None."""
        header = csv_header(root / "metadata.csv")
        if not (root / "images").is_dir() or not all(c in header for c in cls.shared_columns):
            return None
        return header

    @abstractmethod
    def image_path(self, root: Path, row: pd.Series) -> Path | None:
        """The image a row names (possibly absent on disk), or None if the row names none."""

    @abstractmethod
    def patient_of(self, raw_id: str) -> str:
        """The patient id for a row's ``patientid``."""

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        frame = read_table(
            root / "metadata.csv",
            self.shared_columns + self.image_columns,
            f"the {self.name} metadata (one row per image)",
        )
        out = ManifestBuilder()
        for index, row in frame.iterrows():
            where = f"metadata.csv line {csv_line(index)}"
            # Inclusion criteria, not rejections: X-rays, frontal views.
            modality = cell(row, "modality")
            if modality is not None and modality.lower() != "x-ray":
                continue
            view = normalize_view(cell(row, "view"))
            if view == "lateral":
                continue
            raw_id = cell(row, "patientid")
            image = self.image_path(root, row)
            if image is None:
                out.reject(where, "row names no image")
                continue
            finding = cell(row, "finding")
            if finding is None:
                label, finding = "other", BLANK_FINDING
            else:
                label, reason = cohen_label(finding.split(",")[0])
                if label is None:
                    out.reject(image, f"{where}: {reason}")
                    continue
            out.add(
                image,
                where=where,
                source=self.name,
                label=label,
                finding=finding,
                patient=None if raw_id is None else self.patient_of(raw_id),
                view=view,
                sex=cell(row, "sex"),
                age=cell(row, "age"),
            )
        return out.table()
