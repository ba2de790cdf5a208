"""PadChest (Hospital San Juan, Alicante, 2019): one CSV + ``<ImageDir>/<ImageID>`` 16-bit PNGs.

160,868 radiographs of 67,625 patients (2009-2017) with 174 findings, 27% labelled by
radiologists and the rest by an RNN on the Spanish reports. The layout follows the
BIMCV release ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`` (Bustos et al.
2020, Table 2): ``ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth,
PatientSex_DICOM, ViewPosition_DICOM, Projection, MethodLabel, Labels, ...``; images in the
numbered folders ``0/`` ... ``54/`` named by ``ImageDir``.

Labels (`padchest_label`, from ``Labels``, a Python-style list such as
``['pneumonia', 'infiltrates']``): exactly ``['normal']`` -> normal; any of ``pneumonia``,
``atypical pneumonia``, ``viral pneumonia`` -> pneumonia; anything else -> other. The data
predate COVID-19. A row whose Labels cannot be read, or that lists ``exclude``/``suboptimal
study`` (the radiologists' "not assessable"), is reported. Views from ``Projection``: ``PA``,
``AP``, ``AP_horizontal`` (supine) -> AP Supine, ``L`` -> lateral; other projections
(``COSTAL``, ``EXCLUDE``, ``UNK``, ...) are not chest views and are reported. Age = study year −
``PatientBirth``; sex from ``PatientSex_DICOM``; ``study_id`` keeps ``StudyID``.

Citation:
    Aurelia Bustos, Antonio Pertusa, Jose-Maria Salinas, Maria de la Iglesia-Vayá. PadChest:
    A large chest x-ray image dataset with multi-label annotated reports. Medical Image
    Analysis 66:101797, 2020. doi:10.1016/j.media.2020.101797

Download:
    https://bimcv.cipf.es/bimcv-projects/padchest/
"""

from __future__ import annotations

import ast
from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PNEUMONIA = frozenset({"pneumonia", "atypical pneumonia", "viral pneumonia"})
COVID = frozenset({"COVID 19", "COVID 19 uncertain"})
NOT_ASSESSABLE = frozenset({"exclude", "suboptimal study"})
_PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP Supine", "L": "lateral"}


def parse_labels(text: str | None) -> list[str] | None:
    """A PadChest/BIMCV ``Labels`` cell as a list of findings, or None when it is not a list.

    Example:
        >>> parse_labels("['pneumonia', ' infiltrates']"), parse_labels("nan")
        (['pneumonia', 'infiltrates'], None)
    """
    if text is None:
        return None
    try:
        value = ast.literal_eval(text)  # literal_eval evaluates literals only, never code
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return [v.strip() for v in value if v.strip()]


def padchest_label(findings: list[str], covid: bool = False) -> str:
    """Map PadChest findings to a manifest label (``covid`` only when ``covid`` allows it).

    Example:
        >>> padchest_label(["normal"]), padchest_label(["pneumonia", "infiltrates"]), padchest_label(["COVID 19"], covid=True)
        ('normal', 'pneumonia', 'covid')
    """
    present = set(findings)
    if covid and present & COVID:
        return "covid"
    if present & PNEUMONIA:
        return "pneumonia"
    if present == {"normal"}:
        return "normal"
    return "other"


def study_age(study_date: str | None, birth_year: str | None) -> float | None:
    """Age in years at the study from ``YYYYMMDD`` and a birth year (``1932.0``), or None."""
    try:
        return float(int(str(study_date)[:4]) - int(float(str(birth_year))))
    except (TypeError, ValueError):
        return None


@register_source
class PadChestSource(Source):
    """PadChest: one manifest row per CSV row whose image and labels are usable."""

    name = "padchest"
    description = "PadChest: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) + <ImageDir>/<ImageID>.png"
    citation = (
        "Bustos A, Pertusa A, Salinas JM, de la Iglesia-Vayá M. PadChest: A large chest x-ray image dataset "
        "with multi-label annotated reports. Medical Image Analysis 66:101797, 2020"
    )
    url = "https://bimcv.cipf.es/bimcv-projects/padchest/"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / CSV_NAME).is_file() or (root / f"{CSV_NAME}.gz").is_file()

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        csv_path = root / CSV_NAME if (root / CSV_NAME).is_file() else root / f"{CSV_NAME}.gz"
        columns = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection", "Labels")
        frame = read_table(csv_path, columns, "the PadChest table (one row per image)")
        out = ManifestBuilder()
        for index, row in frame.iterrows():
            where = f"{csv_path.name} line {csv_line(index)}"
            name, folder = cell(row, "ImageID"), cell(row, "ImageDir")
            if name is None or folder is None:
                out.reject(where, "row has no ImageID or ImageDir")
                continue
            image = root / folder / name
            findings = parse_labels(cell(row, "Labels"))
            if findings is None:
                out.reject(image, f"{where}: Labels {cell(row, 'Labels')!r} is not a list of findings")
                continue
            if set(findings) & NOT_ASSESSABLE:
                out.reject(image, f"{where}: labelled {sorted(set(findings) & NOT_ASSESSABLE)} (not assessable)")
                continue
            projection = cell(row, "Projection")
            if projection not in _PROJECTIONS:
                out.reject(image, f"{where}: Projection {projection!r} is not a chest view (PA, AP, AP_horizontal, L)")
                continue
            out.add(
                image,
                where=where,
                source=self.name,
                label=padchest_label(findings),
                finding="|".join(findings) or None,
                patient=cell(row, "PatientID"),
                view=_PROJECTIONS[projection],
                sex=cell(row, "PatientSex_DICOM"),
                age=study_age(cell(row, "StudyDate_DICOM"), cell(row, "PatientBirth")),
                study_id=f"{self.name}:{cell(row, 'StudyID')}",
            )
        return out.table()
