"""MIMIC-CXR-JPG (Beth Israel Deaconess, 2019): metadata + CheXpert-labeler CSVs + ``files/pXX/pSUBJECT/sSTUDY/*.jpg``.

377,110 JPEG images of 227,827 studies of 65,379 patients (2011-2016), converted from
MIMIC-CXR's DICOMs. The layout follows the PhysioNet MIMIC-CXR-JPG 2.0.0 / 2.1.0 release
(its README): ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (``dicom_id, subject_id, study_id,
ViewPosition, ...``: one row per image), ``mimic-cxr-2.0.0-chexpert.csv(.gz)``
(``subject_id, study_id`` + the 14 CheXpert observations: one row per *study*) or its NegBio
twin ``mimic-cxr-2.0.0-negbio.csv(.gz)``, and the images at
``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.

Labels: as CheXpert's (`covidcxr.data.sources.chexpert.chexpert_label`), from the study's
row, with the same ``uncertain`` policy (default ``"reject"``) and a ``labeler`` option
(``"chexpert"``, default, or ``"negbio"``). Every image of a study shares its labels. A
study with no label row is reported. Patient ids are ``subject_id``; ``study_id`` is kept.
Sex and age are not part of MIMIC-CXR-JPG (they live in MIMIC-IV's ``patients`` table,
whose ``anchor_age`` is not the age at the study): they are left missing. The data predate
COVID-19.

Citation:
    Alistair E. W. Johnson, Tom J. Pollard, Nathaniel R. Greenbaum, et al. MIMIC-CXR-JPG, a
    large publicly available database of labeled chest radiographs. arXiv:1901.07042, 2019;
    Johnson AEW et al. MIMIC-CXR, a de-identified publicly available database of chest
    radiographs with free-text reports. Scientific Data 6:317, 2019.

Download:
    https://physionet.org/content/mimic-cxr-jpg/
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.data.sources.chexpert import OBSERVATIONS, check_uncertain, chexpert_label, observations

_PREFIX = "mimic-cxr-2.0.0-"
LABELERS = ("chexpert", "negbio")


def _find(root: Path, stem: str) -> Path:
    """``<stem>.csv.gz`` or ``<stem>.csv`` below root (the gzip of the release first)."""
    for name in (f"{_PREFIX}{stem}.csv.gz", f"{_PREFIX}{stem}.csv"):
        if (root / name).is_file():
            return root / name
    return root / f"{_PREFIX}{stem}.csv.gz"


@register_source
class MIMICCXRSource(Source):
    """MIMIC-CXR-JPG: one row per image of the metadata table, labelled by its study.

    Args:
        uncertain: policy for −1 labels: ``"reject"`` (default), ``"positive"``, ``"negative"``.
        labeler: ``"chexpert"`` (default) or ``"negbio"``.
    """

    name = "mimic"
    description = "MIMIC-CXR-JPG 2.0.0/2.1.0: mimic-cxr-2.0.0-metadata.csv(.gz) + -chexpert/-negbio.csv(.gz) + files/pXX/p*/s*/*.jpg"
    citation = (
        "Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly available database of "
        "labeled chest radiographs. arXiv:1901.07042, 2019"
    )
    url = "https://physionet.org/content/mimic-cxr-jpg/"

    def __init__(self, uncertain: str = "reject", labeler: str = "chexpert") -> None:
        self.uncertain = check_uncertain(uncertain)
        if labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS}, not {labeler!r}")
        self.labeler = labeler

    @classmethod
    def detect(cls, root: Path) -> bool:
        return _find(root, "metadata").is_file()

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        meta_path, label_path = _find(root, "metadata"), _find(root, self.labeler)
        metadata = read_table(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"), "one row per image")
        labels = read_table(label_path, ("subject_id", "study_id", "Pneumonia", "No Finding"), "one row per study")
        by_study = {(row["subject_id"], row["study_id"]): observations(row) for _, row in labels.iterrows()}
        out = ManifestBuilder()
        for index, row in metadata.iterrows():
            where = f"{meta_path.name} line {csv_line(index)}"
            subject, study, dicom = cell(row, "subject_id"), cell(row, "study_id"), cell(row, "dicom_id")
            if None in (subject, study, dicom):
                out.reject(where, "row lacks dicom_id, subject_id or study_id")
                continue
            image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            observed = by_study.get((subject, study))
            if observed is None:
                out.reject(image, f"{where}: study {study} has no row in {label_path.name}")
                continue
            try:
                label, finding = chexpert_label(observed, self.uncertain)
            except ValueError as error:
                out.reject(image, f"{where}: study {study} in {label_path.name}: {error}")
                continue
            if label is None:
                out.reject(image, f"{where}: Pneumonia or No Finding is uncertain (-1) in {label_path.name}; uncertain policy 'reject'")
                continue
            out.add(
                image,
                where=where,
                source=self.name,
                label=label,
                finding=finding,
                patient=subject,
                view=cell(row, "ViewPosition"),
                study_id=f"{self.name}:{study}",
            )
        return out.table()


__all__ = ["MIMICCXRSource", "OBSERVATIONS"]
