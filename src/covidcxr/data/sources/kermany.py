"""Kermany pediatric chest X-rays ("ChestXRay2017", Kaggle "chest_xray").

Layout: ``{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (``val`` only in the Kaggle copy).
Anterior-posterior chest X-rays of children aged one to five from Guangzhou Women and
Children's Medical Center. File names carry the patient and the pneumonia type:

- NORMAL: ``IM-0115-0001.jpeg``, ``NORMAL2-IM-1427-0001.jpeg`` -> patient ``IM-0115`` /
  ``NORMAL2-IM-1427`` (the trailing number counts that patient's images);
- PNEUMONIA: ``person1_bacteria_1.jpeg``, ``person1_virus_6.jpeg`` -> patient ``person1``,
  finding ``bacterial pneumonia`` / ``viral pneumonia``, label pneumonia.

The original folder split is kept in the extra column ``source_split`` for reference
only; it never becomes ``split``, since covidcxr makes its own patient-level splits.
View, sex and age are not given.

Citation:
    Daniel S. Kermany, Michael Goldbaum, Wenjia Cai, et al. Identifying Medical Diagnoses
    and Treatable Diseases by Image-Based Deep Learning. Cell 172(5):1122-1131.e9, 2018.
    doi:10.1016/j.cell.2018.02.010. Data: Kermany D, Zhang K, Goldbaum M. Labeled Optical
    Coherence Tomography (OCT) and Chest X-Ray Images for Classification. Mendeley Data v2,
    2018. doi:10.17632/rscbjbr9sj.2

Download:
    https://data.mendeley.com/datasets/rscbjbr9sj/2
    (also https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia)
"""

from __future__ import annotations

import re
from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import SourceLayoutError

_SPLITS = ("train", "val", "test")
_CLASSES = ("NORMAL", "PNEUMONIA")
_NORMAL_NAME = re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d+)-\d+\.(?:jpe?g|png)$", re.IGNORECASE)
_PNEUMONIA_NAME = re.compile(r"^(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+\.(?:jpe?g|png)$", re.IGNORECASE)
_KIND_FINDING = {"bacteria": "bacterial pneumonia", "virus": "viral pneumonia"}


@register_source
class KermanySource(Source):
    """Kermany ChestXRay2017: class folders inside the original split folders.

    A file whose name fits neither naming pattern (or the other class's pattern) is
    rejected with the reason; hidden files (``.DS_Store``) are not images and are skipped.
    """

    name = "kermany"
    description = "Kermany pediatric chest X-rays (ChestXRay2017): {train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg"
    citation = (
        "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and Treatable Diseases by "
        "Image-Based Deep Learning. Cell 172(5):1122-1131.e9, 2018. doi:10.1016/j.cell.2018.02.010; "
        "data: Mendeley Data v2, doi:10.17632/rscbjbr9sj.2"
    )
    url = "https://data.mendeley.com/datasets/rscbjbr9sj/2"

    @classmethod
    def detect(cls, root: Path) -> bool:
        # Upper-case class folders, as published: a hospital's own train/normal tree is not this.
        return any(all((root / split / c).is_dir() for c in _CLASSES) for split in ("train", "test"))

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        folders = [
            (split, klass, root / split / klass)
            for split in _SPLITS
            for klass in _CLASSES
            if (root / split / klass).is_dir()
        ]
        if not folders:
            raise SourceLayoutError(
                root, "has no {train,val,test}/{NORMAL,PNEUMONIA} folders; expected the Kermany layout"
            )
        out = ManifestBuilder()
        for split, klass, folder in folders:
            where = f"{split}/{klass}"
            for path in sorted(folder.iterdir()):
                if path.name.startswith("."):
                    continue
                if not path.is_file():
                    out.reject(path, f"{where} holds a folder where images were expected")
                    continue
                if klass == "NORMAL":
                    match = _NORMAL_NAME.match(path.name)
                    label, finding = "normal", "normal"
                    expected = "IM-NNNN-NNNN.jpeg or NORMAL2-IM-NNNN-NNNN.jpeg"
                else:
                    match = _PNEUMONIA_NAME.match(path.name)
                    label = "pneumonia"
                    finding = _KIND_FINDING[match.group("kind").lower()] if match else None
                    expected = "personN_bacteria_N.jpeg or personN_virus_N.jpeg"
                if match is None:
                    out.reject(path, f"file name matches no {where} naming pattern; expected {expected}")
                    continue
                out.add(
                    path,
                    where=where,
                    source=self.name,
                    label=label,
                    finding=finding,
                    patient=match.group("patient"),
                    source_split=split,
                )
        return out.table()
