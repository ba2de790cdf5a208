"""BIMCV-COVID19+ and BIMCV-COVID19− (Valencian Region, 2020): a MIDS/BIDS tree of PNGs + label TSVs.

BIMCV-COVID19+ holds CR/DX radiographs (and CTs) of patients with a positive PCR or
antibody test for SARS-CoV-2 from 11 hospitals of the Valencian Region; BIMCV-COVID19−
holds radiographs of patients of the same region who tested negative — same-region
negatives, so the classes do not differ by hospital. The layout follows the iteration 1+2
release (the release's Readme, and the loader of DeGrave et al. 2021): images at
``sub-<S…>/ses-<E…>/mod-rx/sub-<S…>_ses-<E…>_run-<n>_bp-chest_vp-<ap|pa|ll>_<cr|dx>.png``,
labels in ``derivatives/labels/labels_covid19_posi.tsv`` (positive set) or a
``derivatives/labels/*.tsv`` of the negative set, tab-separated, with ``ReportID``
(``ses-E…``, the session) and ``Labels`` (PadChest findings, a Python-style list). The
file name gives subject, session and view; the folder name ``sub-…`` is the patient id.
Sex and age come from ``participants.tsv`` when it has ``participant`` plus ``gender``/
``age`` columns (their names in the release were not confirmed here; without them they are
missing).

Labels: the **positive set** -> covid by the default ``covid_labels="molecular"`` policy
(every patient tested positive; DeGrave et al.'s default), or with
``covid_labels="radiologic"`` -> covid only when the report lists ``COVID 19`` /
``COVID 19 uncertain`` and otherwise the PadChest mapping (`covidcxr.data.sources.padchest.padchest_label`).
The **negative set** -> the PadChest mapping (normal, pneumonia, other; never covid). A
session without a label row, a ``Labels`` cell that is not a list, or a view other than
AP/PA/lateral is reported. ``subset`` says which set an image came from
(``covid19_posi``/``covid19_neg``); both sets share the ``bimcv`` patient id prefix.

Citation:
    Maria de la Iglesia Vayá, Jose Manuel Saborit, Joaquim Angel Montell, et al. BIMCV
    COVID-19+: a large annotated dataset of RX and CT images from COVID-19 patients.
    arXiv:2006.01174, 2020.

Download:
    https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source, require_columns
from covidcxr.data.sources.padchest import COVID, padchest_label, parse_labels
from covidcxr.errors import SourceLayoutError

LABELS_DIR = Path("derivatives") / "labels"
_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)_(ses-[A-Za-z0-9]+)_run-\d+_bp-chest_vp-([a-z]+)_(?:cr|dx)\.png$")
_VIEWS = {"ap": "AP", "pa": "PA", "ll": "lateral", "lat": "lateral"}
COVID_POLICIES = ("molecular", "radiologic")


def _read_tsv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise SourceLayoutError(path, f"is not a readable TSV ({error})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, columns, path)
    return frame


@register_source
class BIMCVSource(Source):
    """BIMCV-COVID19+ / − : one row per chest PNG of the MIDS tree that has a label row.

    Args:
        covid_labels: ``"molecular"`` (default: every image of the positive set is covid) or
            ``"radiologic"`` (covid only when the report names COVID 19).
    """

    name = "bimcv"
    description = "BIMCV-COVID19+/-: derivatives/labels/*.tsv (ReportID, Labels) + sub-*/ses-*/mod-rx/*_bp-chest_vp-*_{cr,dx}.png"
    citation = (
        "de la Iglesia Vayá M, Saborit JM, Montell JA, et al. BIMCV COVID-19+: a large annotated dataset of "
        "RX and CT images from COVID-19 patients. arXiv:2006.01174, 2020"
    )
    url = "https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/"

    def __init__(self, covid_labels: str = "molecular") -> None:
        if covid_labels not in COVID_POLICIES:
            raise ValueError(f"covid_labels must be one of {COVID_POLICIES}, not {covid_labels!r}")
        self.covid_labels = covid_labels

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / LABELS_DIR).is_dir() and any(p.name.startswith("sub-") for p in root.iterdir() if p.is_dir())

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        label_files = sorted((root / LABELS_DIR).glob("*.tsv"))
        if not label_files:
            raise SourceLayoutError(root / LABELS_DIR, "has no label .tsv; expected labels_covid19_posi.tsv or the negative set's labels")
        positive = any("posi" in p.name for p in label_files)
        reports: dict[str, tuple[str, str]] = {}
        for path in label_files:
            for index, row in _read_tsv(path, ("ReportID", "Labels")).iterrows():
                reports.setdefault(row["ReportID"].strip(), (row["Labels"], f"{path.name} line {csv_line(index)}"))
        demographics = self._participants(root)
        out = ManifestBuilder()
        for image in self._images(root):
            match = _NAME.match(image.name)
            if match is None:
                out.reject(image, "name is not sub-*_ses-*_run-*_bp-chest_vp-*_{cr,dx}.png")
                continue
            subject, session, view = match.groups()
            if session not in reports:
                out.reject(image, f"session {session} has no row in {LABELS_DIR}/*.tsv")
                continue
            text, where = reports[session]
            findings = parse_labels(text)
            if findings is None:
                out.reject(image, f"{where}: Labels {text!r} is not a list of findings")
                continue
            if view not in _VIEWS:
                out.reject(image, f"view vp-{view} is not AP, PA or lateral")
                continue
            if positive:
                covid = self.covid_labels == "molecular" or bool(set(findings) & COVID)
                label = "covid" if covid else padchest_label(findings)
            else:
                label = padchest_label(findings)
            sex, age = demographics.get(subject, (None, None))
            out.add(
                image,
                where=where,
                source=self.name,
                label=label,
                finding="|".join(findings) or None,
                patient=subject,
                view=_VIEWS[view],
                sex=sex,
                age=age,
                study_id=f"{self.name}:{session}",
                subset="covid19_posi" if positive else "covid19_neg",
            )
        return out.table()

    @staticmethod
    def _images(root: Path) -> list[Path]:
        """Every PNG in a ``sub-*/ses-*/mod-rx`` folder, in sorted order."""
        found = []
        for subject in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")):
            for directory, subdirs, files in os.walk(subject):
                subdirs.sort()
                if Path(directory).name == "mod-rx":
                    found.extend(Path(directory) / f for f in sorted(files) if f.lower().endswith(".png"))
        return found

    @staticmethod
    def _participants(root: Path) -> dict[str, tuple[str | None, str | None]]:
        path = root / "participants.tsv"
        if not path.is_file():
            return {}
        frame = _read_tsv(path, ("participant",))
        return {
            row["participant"].strip(): (cell(row, "gender"), cell(row, "age"))
            for _, row in frame.iterrows()
        }
