"""RSNA Pneumonia Detection Challenge (Kaggle, 2018): labelled DICOMs of NIH ChestX-ray14 images.

Layout: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``: one row per
opacity box, a single row with empty box for an image without one) +
``stage_2_train_images/<patientId>.dcm`` and, optionally,
``stage_2_detailed_class_info.csv`` (``patientId,class``). Each patientId is one image
(the challenge ids are per image, not per person). ``stage_2_test_images`` has no labels
and is not read.

One manifest row per image, however many box rows it has (``n_boxes`` counts them).
Labels: Target 1 -> pneumonia (finding ``Lung Opacity``). Target 0 with the class file:
``Normal`` -> normal, ``No Lung Opacity / Not Normal`` -> other (finding = the class
text). Without the class file, Target 0 -> normal with finding ``Target 0``: that mixes
truly normal images with abnormal images without opacity, so load the class file when
you have it. An image whose rows disagree (both targets, or a class contradicting the
target) is rejected. View, sex and age come from the DICOM header (pixels are not read);
an unreadable header rejects the image.

Citation:
    George Shih, Carol C. Wu, Safwan S. Halabi, et al. Augmenting the National Institutes
    of Health Chest Radiograph Dataset with Expert Annotations of Possible Pneumonia.
    Radiology: Artificial Intelligence 1(1):e180041, 2019. doi:10.1148/ryai.2019180041

Download:
    https://www.kaggle.com/c/rsna-pneumonia-detection-challenge
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.data.sources._common import ManifestBuilder, cell, csv_line, read_table, resolve_root
from covidcxr.data.sources.base import Source, SourceTable, register_source
from covidcxr.errors import ImageReadError
from covidcxr.io import read_dicom_metadata

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
_CLASS_LABEL = {
    "Normal": "normal",
    "No Lung Opacity / Not Normal": "other",
    "Lung Opacity": "pneumonia",
}
# The class each target allows: Target 1 is always "Lung Opacity", Target 0 never.
_TARGET_CLASSES = {"1": {"Lung Opacity"}, "0": {"Normal", "No Lung Opacity / Not Normal"}}


@register_source
class RSNASource(Source):
    """RSNA Pneumonia Detection Challenge stage 2 training set: one row per DICOM."""

    name = "rsna"
    description = (
        "RSNA Pneumonia Detection Challenge: stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv) "
        "+ stage_2_train_images/*.dcm"
    )
    citation = (
        "Shih G, Wu CC, Halabi SS, et al. Augmenting the National Institutes of Health Chest Radiograph "
        "Dataset with Expert Annotations of Possible Pneumonia. Radiology: Artificial Intelligence "
        "1(1):e180041, 2019. doi:10.1148/ryai.2019180041"
    )
    url = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / LABELS_CSV).is_file() and (root / IMAGES_DIR).is_dir()

    def load(self, root: Path) -> SourceTable:
        root = resolve_root(root)
        labels = read_table(
            root / LABELS_CSV, ("patientId", "Target"), "one row per box: patientId,x,y,width,height,Target"
        )
        classes: dict[str, set[str]] | None = None
        if (root / CLASS_CSV).is_file():
            class_table = read_table(root / CLASS_CSV, ("patientId", "class"), "patientId,class")
            classes = {}
            for patient, klass in zip(class_table["patientId"], class_table["class"]):
                classes.setdefault(patient.strip(), set()).add(klass.strip())

        # Several box rows per image: gather them, in first-appearance order.
        first_line: dict[str, int] = {}
        targets: dict[str, set[str]] = {}
        boxes: dict[str, int] = {}
        out = ManifestBuilder()
        for index, row in labels.iterrows():
            patient = cell(row, "patientId")
            if patient is None:
                out.reject(f"{LABELS_CSV} line {csv_line(index)}", "row has no patientId")
                continue
            first_line.setdefault(patient, csv_line(index))
            targets.setdefault(patient, set()).add(cell(row, "Target") or "")
            boxes[patient] = boxes.get(patient, 0) + (cell(row, "x") is not None)

        for patient, line in first_line.items():
            where = f"{LABELS_CSV} line {line}"
            image = root / IMAGES_DIR / f"{patient}.dcm"
            # A patient missing from the class file gets an empty set: rejected, not guessed.
            listed = None if classes is None else classes.get(patient, set())
            label, finding, reason = self._label(targets[patient], listed)
            if label is None:
                out.reject(image, f"{where}: {reason}")
                continue
            meta = None
            if image.is_file():  # an absent file is reported by out.add
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
                finding=finding,
                patient=patient,
                view=None if meta is None else meta.view,
                sex=None if meta is None else meta.sex,
                age=None if meta is None else meta.age,
                n_boxes=boxes[patient],
            )
        return out.table()

    @staticmethod
    def _label(targets: set[str], classes: set[str] | None) -> tuple[str | None, str | None, str | None]:
        """``(label, finding, None)`` for an image's targets and classes, or ``(None, None, reason)``."""
        if len(targets) != 1 or not targets <= {"0", "1"}:
            return None, None, f"Target values {sorted(targets)}; expected a single 0 or 1"
        target = next(iter(targets))
        if classes is None:
            # No class file: Target 0 mixes "Normal" and "No Lung Opacity / Not Normal".
            return ("pneumonia", "Lung Opacity", None) if target == "1" else ("normal", "Target 0", None)
        if not classes:
            return None, None, f"not listed in {CLASS_CSV}"
        if len(classes) != 1 or not classes <= _TARGET_CLASSES[target]:
            return None, None, f"Target {target} contradicts class {sorted(classes)} in {CLASS_CSV}"
        klass = next(iter(classes))
        return _CLASS_LABEL[klass], klass, None
