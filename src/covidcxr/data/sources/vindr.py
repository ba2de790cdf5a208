"""VinDr-CXR (Hospital 108 and Hanoi Medical University Hospital, 2021): label CSVs + DICOMs.

18,000 posteroanterior chest radiographs, 15,000 for training (each read by 3 of 17
radiologists) and 3,000 for testing (consensus of 5). The layout follows the PhysioNet
VinDr-CXR 1.0.0 release (Nguyen et al. 2022, "Data Records"): ``annotations/image_labels_train.csv``
(``image_id, rad_id`` + 28 labels, 0/1, one row per reader),
``annotations/image_labels_test.csv`` (``image_id`` + the same labels, one consensus row),
and the images at ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``.

Labels, over the image's readers (``readers`` option: ``"majority"``, default — more than
half of the readers; or ``"any"`` — at least one): ``Pneumonia`` -> pneumonia; else
``No finding`` -> normal; else other (``finding`` lists the labels so decided). The data
predate COVID-19. The release removed patient identity, so each image is its own patient
(``vindr:<image_id>``): a patient's several images cannot be linked, only near-duplicates
can. View, sex and age come from the DICOM header (pixels are not read); ``split`` keeps
the release's train/test in ``vindr_split``.

Citation:
    Ha Q. Nguyen, Khanh Lam, Linh T. Le, et al. VinDr-CXR: An open dataset of chest X-rays
    with radiologist's annotations. Scientific Data 9:429, 2022. doi:10.1038/s41597-022-01498-w

Download:
    https://physionet.org/content/vindr-cxr/
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import ManifestBuilder, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import ImageReadError
from covidcxr.io import read_dicom_metadata

_TABLES = (("train", "image_labels_train.csv"), ("test", "image_labels_test.csv"))
READER_POLICIES = ("majority", "any")
_NOT_LABELS = {"image_id", "rad_id"}


def vindr_label(votes: pd.DataFrame, readers: str = "majority") -> tuple[str, str]:
    """``(label, finding)`` of one image from its readers' 0/1 rows.

    Example:
        >>> rows = pd.DataFrame({"Pneumonia": [1, 1, 0], "No finding": [0, 0, 1]})
        >>> vindr_label(rows), vindr_label(rows.iloc[[2]]), vindr_label(rows.iloc[[0, 2]])
        (('pneumonia', 'Pneumonia'), ('normal', 'No finding'), ('other', ''))
    """
    share = votes.astype(float).mean(axis=0)
    decided = share > 0.5 if readers == "majority" else share > 0
    positive = [name for name, yes in decided.items() if yes]
    if "Pneumonia" in positive:
        return "pneumonia", "|".join(positive)
    if "No finding" in positive:
        return "normal", "|".join(positive)
    return "other", "|".join(positive)


@register_source
class VinDrCXRSource(Source):
    """VinDr-CXR: one row per image listed in the label CSVs.

    Args:
        readers: how the readers' labels combine: ``"majority"`` (default) or ``"any"``.
    """

    name = "vindr"
    description = "VinDr-CXR 1.0.0: annotations/image_labels_{train,test}.csv + {train,test}/<image_id>.dicom"
    citation = (
        "Nguyen HQ, Lam K, Le LT, et al. VinDr-CXR: An open dataset of chest X-rays with radiologist's "
        "annotations. Scientific Data 9:429, 2022. doi:10.1038/s41597-022-01498-w"
    )
    url = "https://physionet.org/content/vindr-cxr/"

    def __init__(self, readers: str = "majority") -> None:
        if readers not in READER_POLICIES:
            raise ValueError(f"readers must be one of {READER_POLICIES}, not {readers!r}")
        self.readers = readers

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / "annotations" / name).is_file() for _, name in _TABLES)

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        out = ManifestBuilder()
        for split, name in _TABLES:
            csv_path = root / "annotations" / name
            if not csv_path.is_file():
                continue
            frame = read_table(csv_path, ("image_id", "Pneumonia", "No finding"), "one row per image and reader (0/1 labels)")
            labels = [c for c in frame.columns if c not in _NOT_LABELS]
            frame["_line"] = [csv_line(i) for i in range(len(frame))]
            for image_id, votes in frame.groupby("image_id", sort=False):
                where = f"{name} line {votes['_line'].iloc[0]}"
                image = root / split / f"{image_id}.dicom"
                values = votes[labels]
                bad = ~values.isin(["0", "1", "0.0", "1.0"])
                if bad.to_numpy().any():
                    column = values.columns[bad.any(axis=0).to_numpy()][0]
                    out.reject(image, f"{where}: {column} is {values[column][bad[column]].iloc[0]!r}; expected 0 or 1")
                    continue
                label, finding = vindr_label(values, self.readers)
                meta = None
                if image.is_file():
                    try:
                        meta = read_dicom_metadata(image)
                    except ImageReadError as error:
                        out.reject(image, f"{where}: {error.reason}")
                        continue
                out.add(
                    image,
                    where=where,
                    source=self.name,
                    label=label,
                    finding=finding or None,
                    patient=image_id,
                    view=None if meta is None else meta.view,
                    sex=None if meta is None else meta.sex,
                    age=None if meta is None else meta.age,
                    readers=len(votes),
                    vindr_split=split,
                )
        return out.table()
