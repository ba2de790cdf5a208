"""covidcxr: chest X-ray classifiers for COVID-19 and pneumonia, and the truth about them.

NOT FOR MEDICAL USE. covidcxr is a research toolkit. Its models are trained on small,
multi-source collections and are known to learn the hospital, the scanner or text
markers instead of the lungs; its audit exists to show when they do. No output of this
package is a diagnosis.

The data flows one way (see DESIGN.md):
sources -> manifest -> splits -> preprocess -> train -> evaluate/audit -> report/serve.

The names below are the public API, one per step of that journey; each is imported on first
use (PEP 562), so ``import covidcxr`` stays cheap and pulls in neither torch nor MONAI.

Example:
    >>> import covidcxr
    >>> covidcxr.binary_metrics_with_ci([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], ["p1", "p2", "p3", "p4"], n_boot=50)["auc"]["estimate"]
    0.75
    >>> run = covidcxr.load_run("runs/small_shared")                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that owns it
_API = {
    "read_image": "covidcxr.io",
    "load_source": "covidcxr.data.sources",
    "read_manifest": "covidcxr.data.manifest",
    "split_train_val_test": "covidcxr.data.splits",
    "synthesize": "covidcxr.data.synth",
    "PreprocessConfig": "covidcxr.preprocess.pipeline",
    "create_model": "covidcxr.models",
    "list_models": "covidcxr.models",
    "train_recipe": "covidcxr.train.run",
    "load_run": "covidcxr.train.inference",
    "LoadedRun": "covidcxr.train.inference",  # .predict_files / .predict_array: new images, the run's preprocessing
    "RunDir": "covidcxr.rundir",
    "binary_metrics_with_ci": "covidcxr.evaluate.metrics",
    "evaluate_run": "covidcxr.evaluate.cross_source",
    "audit_run": "covidcxr.audit.run",
    "write_report": "covidcxr.report",
}

__all__ = ["MEDICAL_USE_BANNER", "__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'covidcxr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

MEDICAL_USE_BANNER = (
    "covidcxr is a research tool, NOT FOR MEDICAL USE: its outputs are not diagnoses."
)
