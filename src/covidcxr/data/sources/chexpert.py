"""CheXpert (Stanford, 2019): ``train.csv`` / ``valid.csv`` + ``train/patientNNNNN/studyN/viewN_frontal.jpg``.

224,316 chest radiographs of 65,240 patients (Stanford Hospital, 2002-2017), with 14
observations extracted from the reports by the CheXpert labeler: 1.0 positive, 0.0
negative, −1.0 uncertain, blank not mentioned. The layout follows the CheXpert-v1.0 and
CheXpert-v1.0-small releases (Stanford AIMI download, the README of the release): columns
``Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, Enlarged Cardiomediastinum,
Cardiomegaly, Lung Opacity, Lung Lesion, Edema, Consolidation, Pneumonia, Atelectasis,
Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support Devices``; ``Path`` starts
with the release folder (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``),
so it is resolved against the root without its first component. ``test.csv`` (the
radiologist-labelled test set, another column layout) is not read.

Labels (`chexpert_label`): ``Pneumonia`` positive -> pneumonia; else ``No Finding``
positive -> normal; else other. The data predate COVID-19. **Uncertain labels** follow the
adapter's ``uncertain`` policy (Irvin et al. 2019, §4: U-Ones, U-Zeros, U-Ignore):
``"reject"`` (default: an image whose Pneumonia or No Finding is −1 is reported, not
guessed), ``"positive"`` (−1 read as 1) or ``"negative"`` (−1 read as 0); pass it as
``load_source(root, "chexpert", uncertain="positive")``. ``finding`` lists the positive
observations (``?`` marks uncertain ones). Patient ids are the ``patientNNNNN`` folder;
``study_id`` is ``patientNNNNN/studyN``. View: ``Lateral`` -> lateral, else ``AP/PA``.

Citation:
    Jeremy Irvin, Pranav Rajpurkar, Michael Ko, et al. CheXpert: A Large Chest Radiograph
    Dataset with Uncertainty Labels and Expert Comparison. AAAI 2019, 33(01):590-597.

Download:
    https://stanfordmlgroup.github.io/competitions/chexpert/
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_header, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source

_CSV_NAMES = ("train.csv", "valid.csv")
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)  # fmt: skip
UNCERTAIN_POLICIES = ("reject", "positive", "negative")
_STUDY = re.compile(r"(patient\d+)/(study\d+)/")


def _number(name: str, raw: str) -> float:
    """A CheXpert cell as 1.0, 0.0 or −1.0; ValueError naming the observation otherwise."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{name} is {raw!r}; expected 1.0, 0.0, -1.0 or blank")
    return value


def _value(name: str, raw: str | None, uncertain: str) -> float | None:
    """1.0, 0.0 or None (not mentioned) for a CheXpert cell under the uncertain policy; −1.0 under ``reject``."""
    if raw is None:
        return None
    value = _number(name, raw)
    if value == -1.0 and uncertain != "reject":
        return 1.0 if uncertain == "positive" else 0.0
    return value


def chexpert_label(row: dict[str, str | None], uncertain: str = "reject") -> tuple[str | None, str]:
    """Map one image's CheXpert observations to ``(label, finding)``; label None when uncertain and rejected.

    Args:
        row: observation name -> ``"1.0"``, ``"0.0"``, ``"-1.0"`` or None (blank).
        uncertain: ``"reject"``, ``"positive"`` or ``"negative"`` (see the module docstring).

    Returns:
        ``(label, finding)``; ``finding`` lists the positive observations, ``?`` marking uncertain ones.

    Raises:
        ValueError: naming the observation whose cell is not 1.0, 0.0, -1.0 or blank.

    Example:
        >>> chexpert_label({"Pneumonia": "-1.0", "Edema": "1.0"}, "positive")
        ('pneumonia', 'Edema|Pneumonia?')
        >>> chexpert_label({"Pneumonia": "-1.0"})[0] is None
        True
    """
    check_uncertain(uncertain)
    findings = []
    for name in OBSERVATIONS:
        raw = row.get(name)
        value = None if raw is None else _number(name, raw)
        if value in (1.0, -1.0):
            findings.append(name + ("?" if value == -1.0 else ""))
    finding = "|".join(findings) or "no observation mentioned"
    pneumonia, normal = _value("Pneumonia", row.get("Pneumonia"), uncertain), _value("No Finding", row.get("No Finding"), uncertain)
    if pneumonia == 1.0:
        return "pneumonia", finding
    if -1.0 in (pneumonia, normal):
        return None, finding
    if normal == 1.0:
        return "normal", finding
    return "other", finding


def observations(row: pd.Series) -> dict[str, str | None]:
    """A CSV row's observation cells (absent columns are None), for `chexpert_label`."""
    return {name: cell(row, name) for name in OBSERVATIONS}


def check_uncertain(uncertain: str) -> str:
    """Return ``uncertain`` if it is one of `UNCERTAIN_POLICIES`; ValueError otherwise."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    return uncertain


@register_source
class CheXpertSource(Source):
    """CheXpert train + valid: one row per image listed in ``train.csv`` / ``valid.csv``.

    Args:
        uncertain: the policy for −1 labels: ``"reject"`` (default), ``"positive"``, ``"negative"``.
    """

    name = "chexpert"
    description = "CheXpert v1.0(-small): train.csv + valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations) + train/patient*/study*/*.jpg"
    citation = (
        "Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty "
        "Labels and Expert Comparison. AAAI 2019, 33(01):590-597"
    )
    url = "https://stanfordmlgroup.github.io/competitions/chexpert/"

    def __init__(self, uncertain: str = "reject") -> None:
        self.uncertain = check_uncertain(uncertain)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any({"Path", "Frontal/Lateral", "AP/PA"} <= set(csv_header(root / name)) for name in _CSV_NAMES)

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        out = ManifestBuilder()
        present = [root / name for name in _CSV_NAMES if (root / name).is_file()]
        for csv_path in present or [root / _CSV_NAMES[0]]:
            frame = read_table(csv_path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Pneumonia", "No Finding"), "the CheXpert label table (one row per image)")
            for index, row in frame.iterrows():
                where = f"{csv_path.name} line {csv_line(index)}"
                listed = cell(row, "Path")
                match = None if listed is None else _STUDY.search(listed)
                if match is None:
                    out.reject(where, f"Path {listed!r} is not <release>/<split>/patientN/studyN/<view>.jpg")
                    continue
                image = root.joinpath(*Path(listed).parts[1:])
                try:
                    label, finding = chexpert_label(observations(row), self.uncertain)
                except ValueError as error:
                    out.reject(image, f"{where}: {error}")
                    continue
                if label is None:
                    out.reject(image, f"{where}: Pneumonia or No Finding is uncertain (-1); uncertain policy 'reject'")
                    continue
                lateral = (cell(row, "Frontal/Lateral") or "").lower() == "lateral"
                out.add(
                    image,
                    where=where,
                    source=self.name,
                    label=label,
                    finding=finding,
                    patient=match.group(1),
                    view="lateral" if lateral else cell(row, "AP/PA"),
                    sex=cell(row, "Sex"),
                    age=cell(row, "Age"),
                    study_id=f"{self.name}:{match.group(1)}/{match.group(2)}",
                )
        return out.table()
