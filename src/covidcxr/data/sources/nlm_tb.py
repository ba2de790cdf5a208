"""What the two NLM tuberculosis sets share (Montgomery County, Shenzhen).

Both were released by the U.S. National Library of Medicine with the same layout:
``CXR_png/<PREFIX>_NNNN_<0|1>.png`` (``_0`` normal, ``_1`` tuberculosis) and
``ClinicalReadings/<PREFIX>_NNNN_<0|1>.txt`` (sex, age, the radiologist's reading). All
images are PA. `NLMTuberculosisSource` holds the shared logic; the registered adapters
(`covidcxr.data.sources.montgomery`, `covidcxr.data.sources.shenzhen`) say how a reading
is written and where the lung masks are.

Citation:
    Stefan Jaeger, Sema Candemir, Sameer Antani, Yi-Xiang J. Wang, Pu-Xuan Lu, George Thoma.
    Two public chest X-ray datasets for computer-aided screening of pulmonary diseases.
    Quantitative Imaging in Medicine and Surgery 4(6):475-477, 2014.
    doi:10.3978/j.issn.2223-4292.2014.11.20

Download:
    https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets

Labels: ``_0`` -> normal (finding ``normal``); ``_1`` -> other (finding ``tuberculosis``).
patient_id: the file stem without the suffix (``MCUCXR_0001``); each patient has one image.
The NLM readme asks users not to share the data outside their research group.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

from covidcxr.data.sources._common import ManifestBuilder, resolve_root
from covidcxr.data.sources.base import Source, SourceTable
from covidcxr.errors import SourceLayoutError

NLM_CITATION = (
    "Jaeger S, Candemir S, Antani S, Wang YXJ, Lu PX, Thoma G. Two public chest X-ray datasets for "
    "computer-aided screening of pulmonary diseases. Quant Imaging Med Surg 4(6):475-477, 2014. "
    "doi:10.3978/j.issn.2223-4292.2014.11.20"
)
NLM_URL = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
# Every NLM set's file prefix and adapter, so a mixed folder's other images are reported well.
NLM_PREFIXES = {"MCUCXR": "montgomery", "CHNCXR": "shenzhen"}
_SUFFIX_LABEL = {"0": ("normal", "normal"), "1": ("other", "tuberculosis")}


class NLMTuberculosisSource(Source):
    """Base of the NLM TB sets: ``CXR_png/`` images, ``ClinicalReadings/`` texts, masks.

    Subclasses set `prefix` and the class attributes of `Source`, and implement
    `parse_reading` and `mask_for`.
    """

    prefix: ClassVar[str]

    @classmethod
    def detect(cls, root: Path) -> bool:
        return next((root / "CXR_png").glob(f"{cls.prefix}_*.png"), None) is not None

    @staticmethod
    @abstractmethod
    def parse_reading(text: str) -> tuple[str | None, str | None, str]:
        """Split a clinical reading into ``(sex, age text, reading)``; unknown parts are None."""

    @abstractmethod
    def mask_for(self, root: Path, stem: str, out: ManifestBuilder) -> Path | None:
        """The lung mask of image ``stem`` (a file), or None; problems go to ``out.reject``."""

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        folder = root / "CXR_png"
        if not folder.is_dir():
            raise SourceLayoutError(
                folder, f"is missing; expected the {self.name} images ({self.prefix}_NNNN_0.png)"
            )
        pattern = re.compile(rf"^(?P<patient>{self.prefix}_\d+)_(?P<tb>[01])\.png$", re.IGNORECASE)
        out = ManifestBuilder()
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            match = pattern.match(path.name)
            if match is None:
                sibling = next((s for p, s in NLM_PREFIXES.items() if path.name.upper().startswith(p + "_")), None)
                if sibling is not None:
                    out.reject(
                        path, f"a {sibling} image, not {self.name}; load this folder with source={sibling!r} too"
                    )
                else:
                    out.reject(path, f"file name is not {self.prefix}_NNNN_0.png or {self.prefix}_NNNN_1.png")
                continue
            label, finding = _SUFFIX_LABEL[match.group("tb")]
            sex = age = reading = None
            reading_file = root / "ClinicalReadings" / f"{path.stem}.txt"
            if reading_file.is_file():
                sex, age, reading = self.parse_reading(reading_file.read_text(encoding="utf-8", errors="replace"))
            out.add(
                path,
                where="CXR_png",
                source=self.name,
                label=label,
                finding=finding,
                patient=match.group("patient"),
                mask=self.mask_for(root, path.stem, out),
                view="PA",
                sex=sex,
                age=age,
                reading=reading or None,
            )
        return out.table()
