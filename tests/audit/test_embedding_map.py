"""The audit's embedding map: t-SNE always, UMAP when umap-learn is installed (a clear error when not)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from covidcxr.audit import embedding as embedding_module
from covidcxr.audit.embedding import embedding_figure, embedding_map
from covidcxr.audit.run import audit_run
from covidcxr.errors import CovidCXRError


def _two_clusters(n: int = 30, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0.0, 1.0, (n, d)), rng.normal(6.0, 1.0, (n, d))])
    return x, np.repeat([0, 1], n)


def _nearest_neighbour_agreement(coordinates: np.ndarray, groups: np.ndarray) -> float:
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    return float((groups[distances.argmin(axis=1)] == groups).mean())


@pytest.mark.skipif(importlib.util.find_spec("umap") is None, reason="umap-learn is not installed (pip install 'covidcxr[tracking]')")
def test_umap_map_keeps_clusters_apart_and_is_reproducible() -> None:
    x, groups = _two_clusters()
    first = embedding_map(x, "umap", seed=0)
    assert first.shape == (60, 2) and first.dtype == np.float32 and np.isfinite(first).all()
    assert _nearest_neighbour_agreement(first, groups) == 1.0
    np.testing.assert_allclose(embedding_map(x, "umap", seed=0), first)
    shuffled = np.random.default_rng(1).permutation(groups)  # the check can fail: random groups do not agree
    assert _nearest_neighbour_agreement(first, shuffled) < 0.8


def test_tsne_map_is_the_default() -> None:
    x, groups = _two_clusters(n=10, d=8)
    coordinates = embedding_map(x, seed=0)
    assert coordinates.shape == (20, 2) and _nearest_neighbour_agreement(coordinates, groups) == 1.0


def test_umap_without_umap_learn_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    with pytest.raises(CovidCXRError, match=r"umap-learn, which is not installed: pip install 'covidcxr\[tracking\]'"):
        embedding_map(_two_clusters()[0], "umap")
    with pytest.raises(CovidCXRError, match="umap-learn"):  # the audit refuses before its costly steps
        audit_run("no/such/run", embedding="umap")


def test_unknown_method_is_refused_and_the_figure_names_the_method() -> None:
    with pytest.raises(CovidCXRError, match="tsne"):
        embedding_map(_two_clusters()[0], "pca")
    with pytest.raises(CovidCXRError, match="embedding must be one of"):
        audit_run("no/such/run", embedding="isomap")
    x, groups = _two_clusters(n=5, d=4)
    figure = embedding_figure(x[:, 0], x[:, 1], ["a"] * 5 + ["b"] * 5, ["covid" if g else "other" for g in groups], method="umap")
    assert [axis.get_title() for axis in figure.axes[:2]] == ["UMAP coloured by source", "UMAP coloured by label"]
    assert embedding_module.EMBEDDING_METHODS["tsne"] == "t-SNE"


def test_cli_refuses_an_unknown_embedding_method_before_any_work(tmp_path) -> None:
    from typer.testing import CliRunner

    from covidcxr.cli import app

    result = CliRunner().invoke(app, ["audit", str(tmp_path), "--embedding", "pca"])
    assert result.exit_code != 0
    assert "embedding must be one of ['tsne', 'umap']" in str(result.exception) + result.output
