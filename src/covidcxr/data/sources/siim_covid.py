"""SIIM-FISABIO-RSNA COVID-19 Detection (Kaggle, 2021): study-level labels + ``train/<study>/<series>/<image>.dcm``.

6,334 training radiographs (6,054 studies) from BIMCV-COVID19 (Valencia) and MIDRC-RICORD
(USA), each study classified by radiologists into one of four mutually exclusive
appearances (the RSNA consensus categories; Simpson et al. 2020). The layout follows the
competition's data page: ``train_study_level.csv`` (``id`` = ``<StudyInstanceUID>_study``,
``Negative for Pneumonia, Typical Appearance, Indeterminate Appearance, Atypical Appearance``,
one-hot), ``train_image_level.csv`` (``id`` = ``<image>_image``, ``boxes``, ``label``,
``StudyInstanceUID``) and ``train/<StudyInstanceUID>/<SeriesInstanceUID>/<image>.dcm``.
The test set has no labels and is not read.

Labels (``appearance`` policy, a mapping of the four categories onto covidcxr labels; the
default): Negative for Pneumonia -> normal, Typical Appearance -> covid, Indeterminate
Appearance -> covid, Atypical Appearance -> pneumonia. The categories describe the image,
not a test result: "typical" is the pattern of COVID-19 pneumonia, "atypical" that of
other pneumonias (Simpson et al. 2020); pass e.g. ``appearance={"Indeterminate Appearance": None}``
to reject indeterminate studies instead. ``finding`` is the category. A study whose
one-hot row is not exactly one 1 is reported. Patient ids: the DICOM *PatientID* (the
competition's anonymised id, linking a patient's studies) when present, else the study.
View, sex, age from the DICOM header.

Citation:
    Paras Lakhani, J. Mongan, C. Singhal, et al. The 2021 SIIM-FISABIO-RSNA Machine Learning
    COVID-19 Challenge: Annotation and Standard Exam Classification of COVID-19 Chest
    Radiographs. Journal of Digital Imaging 36:365-372, 2023.

Download:
    https://www.kaggle.com/c/siim-covid19-detection
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pydicom

from covidcxr.data.manifest import LABELS
from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import ImageReadError
from covidcxr.io import read_dicom_metadata

STUDY_CSV = "train_study_level.csv"
IMAGE_CSV = "train_image_level.csv"
CATEGORIES = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
DEFAULT_APPEARANCE: dict[str, str | None] = {
    "Negative for Pneumonia": "normal",
    "Typical Appearance": "covid",
    "Indeterminate Appearance": "covid",
    "Atypical Appearance": "pneumonia",
}


def _patient_id(path: Path) -> str | None:
    """The DICOM PatientID (header only), or None."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
    except Exception:  # noqa: BLE001 - any unreadable header falls back to the study id (and read_dicom_metadata reports it)
        return None
    value = str(getattr(dataset, "PatientID", "") or "").strip()
    return value or None


@register_source
class SIIMCovidSource(Source):
    """SIIM-FISABIO-RSNA COVID-19 training set: one row per image of the image-level table.

    Args:
        appearance: overrides of `DEFAULT_APPEARANCE` (category -> label, or None to reject).
    """

    name = "siim_covid"
    description = "SIIM-FISABIO-RSNA COVID-19: train_study_level.csv + train_image_level.csv + train/<study>/<series>/<image>.dcm"
    citation = (
        "Lakhani P, Mongan J, Singhal C, et al. The 2021 SIIM-FISABIO-RSNA Machine Learning COVID-19 "
        "Challenge: Annotation and Standard Exam Classification of COVID-19 Chest Radiographs. "
        "Journal of Digital Imaging 36:365-372, 2023"
    )
    url = "https://www.kaggle.com/c/siim-covid19-detection"

    def __init__(self, appearance: Mapping[str, str | None] | None = None) -> None:
        mapping = {**DEFAULT_APPEARANCE, **(appearance or {})}
        for category, label in mapping.items():
            if category not in CATEGORIES or (label is not None and label not in LABELS):
                raise ValueError(f"appearance maps {category!r} to {label!r}; expected {list(CATEGORIES)} -> {list(LABELS)} or None")
        self.appearance = mapping

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / STUDY_CSV).is_file() and (root / IMAGE_CSV).is_file()

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        studies = read_table(root / STUDY_CSV, ("id", *CATEGORIES), "one row per study: id + four one-hot categories")
        images = read_table(root / IMAGE_CSV, ("id", "StudyInstanceUID"), "one row per image: id, boxes, label, StudyInstanceUID")
        out = ManifestBuilder()
        category_of: dict[str, str | None] = {}
        for index, row in studies.iterrows():
            study = (cell(row, "id") or "").removesuffix("_study")
            hot = [c for c in CATEGORIES if cell(row, c) in ("1", "1.0")]
            category_of[study] = hot[0] if len(hot) == 1 else None
            if len(hot) != 1:
                out.reject(f"{STUDY_CSV} line {csv_line(index)}", f"study {study} has {len(hot)} categories set; expected exactly one")
        files = {p.stem: p for p in (root / "train").glob("*/*/*.dcm")} if (root / "train").is_dir() else {}
        for index, row in images.iterrows():
            where = f"{IMAGE_CSV} line {csv_line(index)}"
            image_id, study = (cell(row, "id") or "").removesuffix("_image"), cell(row, "StudyInstanceUID")
            image = files.get(image_id, root / "train" / str(study) / "?" / f"{image_id}.dcm")
            if study not in category_of:
                out.reject(image, f"{where}: study {study} has no row in {STUDY_CSV}")
                continue
            category = category_of[study]
            if category is None:
                continue  # already reported with its study row
            label = self.appearance[category]
            if label is None:
                out.reject(image, f"{where}: {category} is mapped to no label (appearance policy)")
                continue
            meta, patient = None, study
            if image.is_file():
                try:
                    meta = read_dicom_metadata(image)
                except ImageReadError as error:
                    out.reject(image, f"{where}: {error.reason}")
                    continue
                patient = _patient_id(image) or study
            out.add(
                image,
                where=where,
                source=self.name,
                label=label,
                finding=category,
                patient=patient,
                view=None if meta is None else meta.view,
                sex=None if meta is None else meta.sex,
                age=None if meta is None else meta.age,
                study_id=f"{self.name}:{study}",
            )
        return out.table()
