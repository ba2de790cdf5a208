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
from covidcxr.data.sources import collection  # noqa: E402,F401

__all__ = [
    "SOURCES",
    "Rejection",
    "Source",
    "SourceTable",
    "detect_source",
    "load_source",
    "register_source",
]
