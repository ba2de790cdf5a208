"""The error types covidcxr raises for bad input.

Every error names the thing that was wrong (a file, a manifest row and column, a split)
and what was expected, so a user never has to read a traceback from inside a library.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class CovidCXRError(Exception):
    """Base class of every error covidcxr raises on purpose."""


class ImageReadError(CovidCXRError):
    """An image file could not be read as a single-frame chest X-ray.

    Attributes:
        path: the file that failed.
        reason: what was wrong, in words (e.g. "truncated PNG", "multi-frame DICOM").
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class ImageTooLargeError(ImageReadError):
    """The image's header declares more pixels than allowed (decompression-bomb guard)."""


class ManifestError(CovidCXRError):
    """A manifest row or column does not honour the manifest contract.

    Attributes:
        row: the offending row's index label (None for table-wide problems).
        column: the offending column (None when the problem is not one column's).
        reason: what was expected.
    """

    def __init__(self, reason: str, row: object = None, column: str | None = None, image: str | None = None):
        self.row = row
        self.column = column
        self.reason = reason
        where = []
        if row is not None:
            where.append(f"row {row}")
        if image:
            where.append(f"image {image}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = f"manifest {', '.join(where)}: " if where else "manifest: "
        super().__init__(prefix + reason)


class SourceLayoutError(CovidCXRError):
    """A directory does not have the layout a source adapter expects.

    Attributes:
        path: the directory or file that is missing or malformed.
        reason: what was expected there.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LeakageError(CovidCXRError):
    """A patient or a near-duplicate image sits on both sides of a train/test boundary.

    Attributes:
        offenders: one line per offending patient or duplicate group, naming the
            images and the splits they fell into.
    """

    def __init__(self, message: str, offenders: Sequence[str]):
        self.offenders = list(offenders)
        shown = "\n  ".join(self.offenders[:20])
        more = f"\n  ... and {len(self.offenders) - 20} more" if len(self.offenders) > 20 else ""
        super().__init__(f"{message} ({len(self.offenders)} offenders):\n  {shown}{more}")


class LabelConflictError(CovidCXRError):
    """Byte-identical copies of one image are filed under different labels.

    Attributes:
        offenders: one line per file hash, naming every copy and its label.
    """

    def __init__(self, message: str, offenders: Sequence[str]):
        self.offenders = list(offenders)
        shown = "\n  ".join(self.offenders[:20])
        more = f"\n  ... and {len(self.offenders) - 20} more" if len(self.offenders) > 20 else ""
        super().__init__(f"{message} ({len(self.offenders)} offenders):\n  {shown}{more}")
