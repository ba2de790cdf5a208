"""Data: the manifest contract, source adapters, splits, near-duplicates, compositions, phantoms."""

from covidcxr.data.manifest import (
    LABELS,
    MANIFEST_COLUMNS,
    make_manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)

__all__ = ["LABELS", "MANIFEST_COLUMNS", "make_manifest", "read_manifest", "validate_manifest", "write_manifest"]
