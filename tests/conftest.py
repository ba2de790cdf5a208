"""Shared fixtures: tiny generated images and manifests, and the optional real collection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from generated_data import make_tiny_manifest

# The collection lives beside the checkout (../shared/data/cxr); COVIDCXR_SHARED_DATA overrides.
SHARED_COLLECTION = Path(
    os.environ.get("COVIDCXR_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr")
)


@pytest.fixture(scope="session")
def shared_collection() -> Path:
    """The real multi-source collection beside the checkout; skips the test where it is absent."""
    if not (SHARED_COLLECTION / "manifest.csv").is_file():
        pytest.skip(f"the shared CXR collection is not at {SHARED_COLLECTION} (only present on the project's machines)")
    return SHARED_COLLECTION


@pytest.fixture()
def tiny_manifest(tmp_path: Path):
    """Two sources, three labels, 2 images per patient (distinct pixels everywhere)."""
    return make_tiny_manifest(
        tmp_path,
        {"site_a": {"covid": 10, "normal": 8, "pneumonia": 6}, "site_b": {"normal": 10, "pneumonia": 10}},
        images_per_patient=2,
    )


@pytest.fixture(autouse=True)
def _fingerprint_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Commands cache fingerprints under pytest's temporary folder, never in the checkout."""
    monkeypatch.setenv("COVIDCXR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "covidcxr-cache"))
