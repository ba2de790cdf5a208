"""NIH ChestX-ray14 (ChestX-ray8): ``Data_Entry_2017.csv`` + PNG images anywhere below.

112,120 frontal chest X-rays of 30,805 patients from the NIH Clinical Center, with 14
finding labels mined from the radiology reports by NLP (noisy). The images come in parts
(``images_001.tar.gz`` ... or Kaggle's ``images_001/images/``), so the adapter finds them
by file name anywhere under the root, and reports every row whose image is not there.

Labels from ``Finding Labels`` (``|``-separated): ``No Finding`` -> normal; a set
containing ``Pneumonia`` -> pneumonia; anything else -> other. ``finding`` keeps the full
label set verbatim. Patient ids are the zero-padded ``Patient ID`` (``00000061``), as in
the image names. The data predate COVID-19.

Citation:
    Xiaosong Wang, Yifan Peng, Le Lu, Zhiyong Lu, Mohammadhadi Bagheri, Ronald M. Summers.
    ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised
    Classification and Localization of Common Thorax Diseases. CVPR 2017, 2097-2106.

Download:
    https://nihcc.app.box.com/v/ChestXray-NIHCC
"""

from __future__ import annotations

import os
from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source

# The 2020 revision first: it is the current one when both are present.
_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")


def nih_label(finding_labels: str) -> str:
    """Map an NIH ``Finding Labels`` value to a manifest label.

    Example:
        >>> nih_label("No Finding"), nih_label("Infiltration|Pneumonia"), nih_label("Effusion")
        ('normal', 'pneumonia', 'other')
    """
    labels = {label.strip() for label in finding_labels.split("|")}
    if labels == {"No Finding"}:
        return "normal"
    if "Pneumonia" in labels:
        return "pneumonia"
    return "other"


def _patient(raw: str) -> str:
    # Zero-pad numeric ids to the 8 digits the image names use (00000061_012.png).
    return f"{int(raw):08d}" if raw.isdigit() else raw


@register_source
class NIHSource(Source):
    """NIH ChestX-ray14: the Data_Entry CSV and its PNGs (searched for below the root).

    Every CSV row whose image is absent is one `Rejection` (a partial download yields many:
    they say which parts are missing). When a file name occurs twice below the root, the
    first copy (in sorted walk order) is used and the other reported.
    """

    name = "nih"
    description = "NIH ChestX-ray14: Data_Entry_2017(_v2020).csv + images/ or images_*/images/ (PNG)"
    citation = (
        "Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray "
        "Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax "
        "Diseases. CVPR 2017, 2097-2106"
    )
    url = "https://nihcc.app.box.com/v/ChestXray-NIHCC"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / name).is_file() for name in _CSV_NAMES)

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        csv_path = next((root / n for n in _CSV_NAMES if (root / n).is_file()), root / _CSV_NAMES[-1])
        frame = read_table(csv_path, _COLUMNS, "the NIH Data_Entry table (one row per image)")
        out = ManifestBuilder()
        images = self._find_images(root, out)
        for index, row in frame.iterrows():
            where = f"{csv_path.name} line {csv_line(index)}"
            name = cell(row, "Image Index")
            if name is None:
                out.reject(where, "row has no Image Index")
                continue
            image = images.get(name)
            if image is None:
                out.reject(root / name, f"listed in {where} but no file of that name is below {root}")
                continue
            findings = cell(row, "Finding Labels") or ""
            if not findings:
                out.reject(image, f"{where}: Finding Labels is empty")
                continue
            patient = cell(row, "Patient ID")
            out.add(
                image,
                where=where,
                source=self.name,
                label=nih_label(findings),
                finding=findings,
                patient=None if patient is None else _patient(patient),
                view=cell(row, "View Position"),
                sex=cell(row, "Patient Gender"),
                age=cell(row, "Patient Age"),
            )
        return out.table()

    @staticmethod
    def _find_images(root: Path, out: ManifestBuilder) -> dict[str, Path]:
        """Map every PNG file name below ``root`` to its path, in one walk."""
        found: dict[str, Path] = {}
        for directory, subdirs, files in os.walk(root):
            # Sorted and without hidden folders (.covidcxr caches), so the walk is deterministic.
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for filename in sorted(files):
                if not filename.lower().endswith(".png"):
                    continue
                path = Path(directory) / filename
                if filename in found:
                    out.reject(path, f"second copy of {filename}; using {found[filename]}")
                    continue
                found[filename] = path
        return found
