"""The contract every source adapter honours, and the registry that finds them.

An adapter turns one dataset's public layout (its folders, CSVs, DICOMs) into the
canonical manifest (`covidcxr.data.manifest`). Adapters never read pixels beyond what
they need for metadata, never drop an item silently, and never copy data: each returns
a `SourceTable` — the manifest plus every item it had to reject, with the reason.

Adding an adapter: a new module in this folder with a `Source` subclass decorated with
`@register_source`, and an import of that module in ``sources/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from covidcxr.errors import SourceLayoutError


@dataclass(frozen=True)
class Rejection:
    """An item an adapter (or a batch job) could not use, and why.

    Attributes:
        path: the file or ``file:row`` that was rejected.
        reason: what was wrong, in words.
    """

    path: str
    reason: str


@dataclass
class SourceTable:
    """What an adapter returns: the manifest and everything it rejected.

    Attributes:
        manifest: the canonical manifest (see `covidcxr.data.manifest`).
        rejected: every item left out for a reason other than the adapter's documented
            inclusion criteria (e.g. a CSV row whose image file is absent).
    """

    manifest: pd.DataFrame
    rejected: list[Rejection] = field(default_factory=list)


class Source(ABC):
    """A dataset layout that can be read into a manifest.

    Subclasses set `name` (also the manifest's ``source`` value unless the layout names
    its own sources), a one-line `description`, `citation` and `url`, and implement
    `detect` and `load`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    citation: ClassVar[str]
    url: ClassVar[str]

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool:
        """Cheaply tell whether ``root`` looks like this source's public layout."""

    @abstractmethod
    def load(self, root: Path) -> SourceTable:
        """Read ``root`` into a `SourceTable`.

        Raises:
            SourceLayoutError: when a file the layout needs is missing or malformed,
                naming the file and what was expected.
        """


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator adding an adapter to `SOURCES` under its ``name``."""
    if cls.name in SOURCES:
        raise ValueError(f"source adapter {cls.name!r} is registered twice")
    SOURCES[cls.name] = cls
    return cls


def detect_source(root: str | Path) -> str:
    """Return the name of the one adapter whose layout ``root`` has.

    Adapters are tried in registry order; the first match wins, so specific layouts are
    registered before the generic one.

    Raises:
        SourceLayoutError: when ``root`` is not a directory or no adapter recognises it.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceLayoutError(root, "is not a directory")
    for name, cls in SOURCES.items():
        if cls.detect(root):
            return name
    raise SourceLayoutError(
        root,
        "matches no known layout; expected a manifest.csv or one of the public layouts of "
        f"{sorted(SOURCES)} (name one with --source)",
    )


def load_source(root: str | Path, source: str | None = None, **options: object) -> SourceTable:
    """Read a directory into a `SourceTable`, detecting its layout unless ``source`` names it.

    ``options`` go to the adapter's constructor (e.g. ``uncertain="positive"`` for CheXpert's
    −1 labels); an adapter without options refuses them.

    Example:
        >>> table = load_source("../shared/data/cxr")  # doctest: +SKIP
        >>> table.manifest.groupby(["source", "label"]).size()  # doctest: +SKIP
    """
    root = Path(root)
    if source is None:
        source = detect_source(root)
    if source not in SOURCES:
        raise SourceLayoutError(root, f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    if not root.is_dir():
        raise SourceLayoutError(root, "is not a directory")
    try:
        adapter = SOURCES[source](**options)
    except (TypeError, ValueError) as error:
        raise SourceLayoutError(root, f"adapter {source!r} refuses the options {options} ({error})") from None
    return adapter.load(root)


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise `SourceLayoutError` saying what it should hold."""
    if not path.is_file():
        raise SourceLayoutError(path, f"is missing; expected {what}")
    return path


def require_columns(frame: pd.DataFrame, columns: list[str] | tuple[str, ...], path: Path) -> None:
    """Raise `SourceLayoutError` naming the CSV and the columns it lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceLayoutError(path, f"lacks columns {missing}; found {list(frame.columns)}")
