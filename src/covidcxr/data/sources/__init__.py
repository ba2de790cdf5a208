"""Source adapters: one module per dataset layout, all returning the canonical manifest.

`load_source(root)` detects the layout; `SOURCES` lists the adapters by name. The
registration order below is the detection order: specific layouts first, the generic
hospital adapter last.
"""

from covidcxr.data.sources.base import (
    SOURCES,
    Rejection,
    Source,
    SourceTable,
    detect_source,
    load_source,
    register_source,
)

# Registration happens on import; order = detection order.
# Specific layouts first; figure1 after cohen/actualmed (its metadata.csv has no file column);
# hospital last, as it accepts any folder of label-named sub-folders.
from covidcxr.data.sources import collection  # noqa: E402,F401
from covidcxr.data.sources import cohen  # noqa: E402,F401
from covidcxr.data.sources import actualmed  # noqa: E402,F401
from covidcxr.data.sources import figure1  # noqa: E402,F401
from covidcxr.data.sources import kermany  # noqa: E402,F401
from covidcxr.data.sources import rsna  # noqa: E402,F401
from covidcxr.data.sources import nih  # noqa: E402,F401
from covidcxr.data.sources import montgomery  # noqa: E402,F401
from covidcxr.data.sources import shenzhen  # noqa: E402,F401
from covidcxr.data.sources import chexpert  # noqa: E402,F401
from covidcxr.data.sources import mimic  # noqa: E402,F401
from covidcxr.data.sources import padchest  # noqa: E402,F401
from covidcxr.data.sources import vindr  # noqa: E402,F401
from covidcxr.data.sources import bimcv  # noqa: E402,F401
from covidcxr.data.sources import siim_covid  # noqa: E402,F401
from covidcxr.data.sources import covidx  # noqa: E402,F401
from covidcxr.data.sources import hospital  # noqa: E402,F401

__all__ = [
    "SOURCES",
    "Rejection",
    "Source",
    "SourceTable",
    "detect_source",
    "load_source",
    "register_source",
]
