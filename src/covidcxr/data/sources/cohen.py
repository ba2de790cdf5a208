"""COVID-19 Image Data Collection (Cohen et al.): ``metadata.csv`` + ``images/``.

Images of COVID-19 and other pneumonias collected from publications, websites and
hospitals; one CSV row per image.

Citation:
    Joseph Paul Cohen, Paul Morrison, Lan Dao, Karsten Roth, Tim Q Duong, Marzyeh Ghassemi.
    COVID-19 Image Data Collection: Prospective Predictions Are the Future.
    Machine Learning for Biomedical Imaging (MELBA), 2020. arXiv:2006.11988.

Download:
    https://github.com/ieee8023/covid-chestxray-dataset

Inclusion criteria (rows outside them are not rejections): ``modality`` is ``X-ray`` and
``view`` is PA, AP or AP Supine; lateral (``L``), axial and coronal entries are left out.

Labels from ``finding``, flat (``COVID-19``, ``COVID-19, ARDS``, ``Streptococcus``) or
hierarchical (``Pneumonia/Viral/COVID-19``, ``Pneumonia/Bacterial/Klebsiella``) as in newer
versions: COVID-19 anywhere -> covid; ``No Finding`` -> normal; ARDS alone or Tuberculosis ->
other; any other pneumonia (SARS, MERS, bacterial, viral, fungal, Pneumocystis,
Streptococcus, Klebsiella, Legionella, Mycoplasma, Chlamydophila, E.Coli, Varicella,
Influenza, Lipoid, aspiration...) -> pneumonia. ``todo``/``Unknown`` rows and findings
that fit none of these are rejected with the reason. ``finding`` keeps the source text.
"""

from __future__ import annotations

import re
from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_header, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source

CITATION = (
    "Cohen JP, Morrison P, Dao L, Roth K, Duong TQ, Ghassemi M. COVID-19 Image Data Collection: "
    "Prospective Predictions Are the Future. Machine Learning for Biomedical Imaging (MELBA), 2020. "
    "arXiv:2006.11988"
)
URL = "https://github.com/ieee8023/covid-chestxray-dataset"

_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
# Frontal X-ray views kept; the keys are the source's spellings (lower-case).
_FRONTAL_VIEWS = {"pa": "PA", "ap": "AP", "ap supine": "AP Supine", "aps": "AP Supine"}
_COVID = re.compile(r"covid|sars-cov-2", re.IGNORECASE)
# Words naming a pneumonia or its pathogen in flat and hierarchical findings.
_PNEUMONIA_WORDS = (
    "pneumonia", "sars", "mers", "bacterial", "viral", "fungal", "pneumocystis", "pcp",
    "streptococcus", "staphylococcus", "mrsa", "klebsiella", "legionella", "mycoplasma",
    "chlamydophila", "chlamydia", "e.coli", "varicella", "influenza", "h1n1", "herpes",
    "lipoid", "aspiration", "nocardia", "aspergillosis",
)  # fmt: skip
_OTHER_WORDS = ("ards", "tuberculosis")
_UNASSIGNED = ("todo", "unknown")


def cohen_label(finding: str | None) -> tuple[str | None, str | None]:
    """Map a Cohen ``finding`` (flat or hierarchical) to ``(label, None)`` or ``(None, reason)``.

    Example:
        >>> cohen_label("Pneumonia/Viral/COVID-19"), cohen_label("ARDS")
        (('covid', None), ('other', None))
        >>> cohen_label("todo")
        (None, "finding is 'todo'")
    """
    if finding is None:
        return None, "finding is empty"
    text = finding.strip()
    if text.lower() in _UNASSIGNED:
        return None, f"finding is {text!r}"
    if _COVID.search(text):
        return "covid", None
    if text.lower() == "no finding":
        return "normal", None
    # Hierarchy levels ("/") and co-findings (",") are separate parts; "E.Coli" stays whole.
    parts = [p.strip().lower() for p in re.split(r"[/,]", text) if p.strip()]
    words = {w for part in parts for w in re.split(r"[\s_-]+", part)} | set(parts)
    if any(word in words for word in _PNEUMONIA_WORDS):
        return "pneumonia", None
    if parts and all(part in _OTHER_WORDS for part in parts):
        return "other", None
    return None, (
        f"unrecognised finding {text!r}; expected COVID-19, No Finding, a pneumonia type, "
        "ARDS or Tuberculosis"
    )


@register_source
class CohenSource(Source):
    """ieee8023/covid-chestxray-dataset: frontal X-rays listed in ``metadata.csv``.

    Rows whose image file is absent, whose finding is ``todo`` or unrecognised, or whose
    patient id is empty are rejected with the reason. Images live in the row's ``folder``
    (``images`` when the column is absent or blank).
    """

    name = "cohen"
    description = "Cohen COVID-19 image data collection: metadata.csv + images/ (frontal X-rays only)"
    citation = CITATION
    url = URL

    @classmethod
    def detect(cls, root: Path) -> bool:
        header = csv_header(root / "metadata.csv")
        return (root / "images").is_dir() and all(column in header for column in _COLUMNS)

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        frame = read_table(root / "metadata.csv", _COLUMNS, "the Cohen metadata (one row per image)")
        out = ManifestBuilder()
        for index, row in frame.iterrows():
            where = f"metadata.csv line {csv_line(index)}"
            # Inclusion criteria, not rejections: X-ray only, frontal views only.
            if (cell(row, "modality") or "").lower() != "x-ray":
                continue
            view = _FRONTAL_VIEWS.get((cell(row, "view") or "").lower())
            if view is None:
                continue
            filename = cell(row, "filename")
            if filename is None:
                out.reject(where, "row has no filename")
                continue
            image = root / (cell(row, "folder") or "images") / filename
            finding = cell(row, "finding")
            label, reason = cohen_label(finding)
            if label is None:
                out.reject(image, f"{where}: {reason}")
                continue
            out.add(
                image,
                where=where,
                source=self.name,
                label=label,
                finding=finding,
                patient=cell(row, "patientid"),
                view=view,
                sex=cell(row, "sex"),
                age=cell(row, "age"),
                license=cell(row, "license"),
            )
        return out.table()
