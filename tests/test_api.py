"""The top-level API: every public name resolves, lazily, to the function its owner module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import covidcxr


@pytest.mark.parametrize("name", sorted(covidcxr._API))
def test_every_public_name_is_its_owner_modules_object(name: str) -> None:
    owner = importlib.import_module(covidcxr._API[name])
    assert getattr(covidcxr, name) is getattr(owner, name)
    assert name in dir(covidcxr) and name in covidcxr.__all__


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        covidcxr.nope  # noqa: B018


def test_import_is_cheap() -> None:
    # `import covidcxr` must not pull in torch (users import it in notebooks and CLIs).
    code = "import sys, covidcxr; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_docstring_example_runs() -> None:
    metrics = covidcxr.binary_metrics_with_ci([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], ["p1", "p2", "p3", "p4"], n_boot=50)
    assert metrics["auc"]["estimate"] == pytest.approx(0.75)
