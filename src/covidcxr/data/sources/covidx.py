"""COVIDx CXR (COVID-Net, 2020-2023): split lists ``train.txt``/``val.txt``/``test.txt`` + ``train/``, ``val/``, ``test/``.

COVIDx is not a collection of its own but a curated union of public sets (Cohen's
covid-chestxray-dataset, Figure1, Actualmed, SIRM, RSNA Pneumonia, RICORD, BIMCV, ...);
mixing it with those sources' own adapters duplicates images — the near-duplicate grouping
links them. The layout follows the COVID-Net repository's ``docs/COVIDx.md`` (COVIDx V5-V9
and COVIDx CXR-2/3/4 on Kaggle): each line of a split list is
``<patient id> <file name> <class> <data source>`` separated by spaces, the image in the
folder named like the list (``train.txt`` -> ``train/``; the versioned names
``train_COVIDx9A.txt`` -> ``train/`` too).

Labels: ``COVID-19`` / ``positive`` -> covid; ``pneumonia`` -> pneumonia; ``normal`` ->
normal; ``negative`` (CXR-2 onwards: normal *or* non-COVID pneumonia) -> the ``negative``
option, ``"other"`` by default (neither normal nor pneumonia can be claimed). Patient ids are
COVIDx's per-source ids prefixed by the data source (``covidx:rsna/1234``), since the
sources number patients independently. ``data_source`` keeps the list's source; the split
list in ``covidx_split``. View, sex and age are not in the lists (missing).

Citation:
    Linda Wang, Zhong Qiu Lin, Alexander Wong. COVID-Net: a tailored deep convolutional
    neural network design for detection of COVID-19 cases from chest X-ray images.
    Scientific Reports 10:19549, 2020. doi:10.1038/s41598-020-76550-z

Download:
    https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md
"""

from __future__ import annotations

import re
from pathlib import Path

from covidcxr.data.manifest import LABELS
from covidcxr.data.sources._common import ManifestBuilder, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source

_LIST = re.compile(r"^(train|val|test)(_COVIDx[\w.]*)?\.txt$")
_CLASSES = {"covid-19": "covid", "positive": "covid", "pneumonia": "pneumonia", "normal": "normal"}


def _lists(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and _LIST.match(p.name))


@register_source
class COVIDxSource(Source):
    """COVIDx: one row per line of every split list beside its image folder.

    Args:
        negative: the label for the ``negative`` class (default ``"other"``).
    """

    name = "covidx"
    description = "COVIDx CXR (COVID-Net): train/val/test(.txt or _COVIDx*.txt) lines 'patient file class source' + train/ val/ test/"
    citation = (
        "Wang L, Lin ZQ, Wong A. COVID-Net: a tailored deep convolutional neural network design for detection "
        "of COVID-19 cases from chest X-ray images. Scientific Reports 10:19549, 2020"
    )
    url = "https://github.com/lindawangg/COVID-Net/blob/master/docs/COVIDx.md"

    def __init__(self, negative: str = "other") -> None:
        if negative not in LABELS:
            raise ValueError(f"negative must be one of {list(LABELS)}, not {negative!r}")
        self.negative = negative

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / _LIST.match(p.name).group(1)).is_dir() for p in _lists(root))

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        out = ManifestBuilder()
        for list_path in _lists(root):
            split = _LIST.match(list_path.name).group(1)
            with open(list_path, encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, start=1):
                    where = f"{list_path.name} line {number}"
                    fields = line.split()
                    if not fields:
                        continue
                    if len(fields) != 4:
                        out.reject(where, f"has {len(fields)} fields; expected 'patient_id filename class data_source'")
                        continue
                    patient, filename, klass, data_source = fields
                    image = root / split / filename
                    label = self.negative if klass.lower() == "negative" else _CLASSES.get(klass.lower())
                    if label is None:
                        out.reject(image, f"{where}: class {klass!r}; expected COVID-19, pneumonia, normal, positive or negative")
                        continue
                    out.add(
                        image,
                        where=where,
                        source=self.name,
                        label=label,
                        finding=klass,
                        patient=f"{data_source}/{patient}",
                        data_source=data_source,
                        covidx_split=split,
                    )
        return out.table()
