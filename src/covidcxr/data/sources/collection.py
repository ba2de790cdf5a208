"""A curated collection: a folder with a canonical ``manifest.csv`` (the shared CXR data, phantoms).

This is covidcxr's own on-disk format: ``<root>/manifest.csv`` with at least the manifest
columns (see `covidcxr.data.manifest`) and image/mask paths relative to ``<root>``. The
development collection in ``../shared/data/cxr`` and the phantoms written by
``covidcxr data synth`` both use it.
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.data.manifest import MANIFEST_COLUMNS, is_missing, read_manifest
from covidcxr.data.sources.base import Rejection, Source, SourceTable, register_source


@register_source
class CollectionSource(Source):
    """A folder holding ``manifest.csv`` in covidcxr's canonical format.

    Rows whose image file is absent are rejected (reported, not loaded); a mask path that
    is absent is cleared and reported, since the image itself is still usable.
    """

    name = "collection"
    description = "covidcxr canonical collection: manifest.csv + images/ (+ masks/)"
    citation = "See the collection's own README for the citation of each source it curates."
    url = "https://github.com/ieee8023/covid-chestxray-dataset (one of the curated sources)"

    @classmethod
    def detect(cls, root: Path) -> bool:
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            return False
        with open(manifest, encoding="utf-8", errors="replace") as handle:
            header = handle.readline().strip().split(",")
        return all(column in header for column in MANIFEST_COLUMNS)

    def load(self, root: Path) -> SourceTable:
        manifest = read_manifest(root / "manifest.csv")
        rejected: list[Rejection] = []
        image_exists = manifest["image"].map(lambda p: Path(p).is_file())
        for row in manifest.index[~image_exists]:
            rejected.append(Rejection(manifest.at[row, "image"], f"listed in manifest.csv row {row} but the file is absent"))
        manifest = manifest[image_exists].reset_index(drop=True)
        mask_absent = manifest["mask"].map(lambda p: not is_missing(p) and not Path(p).is_file())
        for row in manifest.index[mask_absent]:
            rejected.append(Rejection(manifest.at[row, "mask"], f"mask of {manifest.at[row, 'image']} is absent; image kept without mask"))
        manifest.loc[mask_absent, "mask"] = None
        return SourceTable(manifest, rejected)
