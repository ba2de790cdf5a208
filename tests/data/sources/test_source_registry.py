"""Every adapter is registered in detection order and documents its dataset."""

from __future__ import annotations

import sys

import pytest

from covidcxr.data.sources import SOURCES

EXPECTED_ORDER = [
    "collection", "cohen", "actualmed", "figure1", "kermany", "rsna", "nih", "montgomery", "shenzhen",
    "chexpert", "mimic", "padchest", "vindr", "bimcv", "siim_covid", "covidx", "hospital",
]  # fmt: skip


def test_detection_order_puts_specific_layouts_first_and_hospital_last() -> None:
    assert list(SOURCES) == EXPECTED_ORDER


@pytest.mark.parametrize("name", EXPECTED_ORDER[1:])
def test_adapter_documents_citation_and_download(name: str) -> None:
    cls = SOURCES[name]
    for attribute in ("name", "description", "citation", "url"):
        assert getattr(cls, attribute).strip(), f"{name}.{attribute} is empty"
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    assert "Citation:" in module_doc and "Download:" in module_doc
    if cls.url.startswith("http"):
        assert cls.url in module_doc
