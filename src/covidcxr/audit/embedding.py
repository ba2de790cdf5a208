"""Embedding map: a 2-D t-SNE (or UMAP) of the model's embeddings, coloured by source and by label.

Tartaglione et al. (2020, Fig. 4) plot the t-SNE of their encoder's features and find the
images grouped by the collection they came from rather than by diagnosis. The same
picture, for any run: scikit-learn's `TSNE` (exact for small sets, Barnes-Hut otherwise)
on the PCA-reduced embeddings, and a two-panel figure — by source on the left, by label on
the right. Two panels that look alike mean source and label are entangled in what the
model learned.

`embedding_map` picks the method: ``"tsne"`` (always available) or ``"umap"`` — UMAP
(McInnes, Healy & Melville 2018, arXiv:1802.03426) through ``umap-learn``, an optional
dependency (``pip install covidcxr[tracking]``), which keeps more of the global layout
(how far apart the source clusters are) than t-SNE does.

Example:
    >>> x = np.random.default_rng(0).normal(size=(40, 16))
    >>> embedding_map(x, method="tsne").shape
    (40, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError

__all__ = ["EMBEDDING_METHODS", "embedding_figure", "embedding_map", "plot_embedding", "require_umap", "tsne_map", "umap_map"]

#: method -> the name figures and the report give it
EMBEDDING_METHODS = {"tsne": "t-SNE", "umap": "UMAP"}


def tsne_map(embeddings: np.ndarray, seed: int = 0, max_components: int = 50) -> np.ndarray:
    """``(N, D)`` embeddings -> ``(N, 2)`` t-SNE coordinates (PCA to ``max_components`` first).

    Perplexity is ``min(30, (N - 1) / 3)`` (t-SNE needs perplexity < N).

    Raises:
        CovidCXRError: fewer than 5 images.
    """
    from sklearn.manifold import TSNE

    x = _standardized_pca(embeddings, seed, max_components, "t-SNE")
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x).astype(np.float32)


def _standardized_pca(embeddings: np.ndarray, seed: int, max_components: int, method: str) -> np.ndarray:
    """Standardise each dimension, then PCA to at most ``max_components`` (the usual step before t-SNE/UMAP)."""
    from sklearn.decomposition import PCA

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 5:
        raise CovidCXRError(f"{method} needs (N, D) embeddings with N >= 5; got shape {x.shape}")
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    components = int(min(max_components, x.shape[1], len(x) - 1))
    if components < x.shape[1]:
        x = PCA(n_components=components, random_state=seed).fit_transform(x)
    return x


def require_umap() -> None:
    """Raise a `CovidCXRError` saying how to install umap-learn when it is absent (callers check before costly work)."""
    import importlib.util

    if importlib.util.find_spec("umap") is None:
        raise CovidCXRError(
            "the UMAP embedding map needs umap-learn, which is not installed: pip install 'covidcxr[tracking]' "
            "(or pip install umap-learn), or use the t-SNE map (method 'tsne')"
        )


def umap_map(embeddings: np.ndarray, seed: int = 0, max_components: int = 50, n_neighbors: int = 15) -> np.ndarray:
    """``(N, D)`` embeddings -> ``(N, 2)`` UMAP coordinates (umap-learn; PCA to ``max_components`` first).

    ``n_neighbors`` is capped at ``N - 1``; the seed makes the layout reproducible (umap-learn
    then runs single-threaded).

    Raises:
        CovidCXRError: fewer than 5 images, or umap-learn not installed (the message says how
            to install it, and that ``method="tsne"`` needs nothing more).
    """
    require_umap()
    import umap

    x = _standardized_pca(embeddings, seed, max_components, "UMAP")
    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, len(x) - 1)), random_state=seed, n_jobs=1, init="random" if len(x) < 10 else "spectral")
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def embedding_map(embeddings: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``(N, D)`` embeddings -> ``(N, 2)`` coordinates by ``method`` (``"tsne"`` or ``"umap"``; see the module docstring).

    Raises:
        CovidCXRError: an unknown method, fewer than 5 images, UMAP without umap-learn.
    """
    if method not in EMBEDDING_METHODS:
        raise CovidCXRError(f"embedding method must be one of {list(EMBEDDING_METHODS)}; got {method!r}")
    return tsne_map(embeddings, seed=seed) if method == "tsne" else umap_map(embeddings, seed=seed)


def embedding_figure(
    x: np.ndarray,
    y: np.ndarray,
    sources: Sequence[str],
    labels: Sequence[str],
    source_palette: Mapping[str, str] | None = None,
    label_palette: Mapping[str, str] | None = None,
    training_sources: Sequence[str] | None = None,
    title: str = "",
    method: str = "tsne",
) -> Any:
    """Two-panel scatter of 2-D coordinates: by source (left) and by label (right).

    Colours follow :mod:`covidcxr.report.palette` (a source in the colour the report gives it,
    a label in its fixed colour), each source also has its own marker, and the legends sit
    below the panels so they never hide points.

    Args:
        x, y: (N,) coordinates.
        sources, labels: (N,) source and label of each point.
        source_palette, label_palette: ``{name: colour}`` (default: the palette's own order).
        training_sources: sources the model trained on; the others are tagged "unseen".
        title: figure title.
        method: the map's method (``tsne`` or ``umap``), named in the panel titles.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidcxr.report.palette import label_colors, source_colors, source_markers

    source_array, label_array = np.asarray(sources, dtype=str), np.asarray(labels, dtype=str)
    palettes = {"source": {**source_colors(source_array), **(source_palette or {})},
                "label": {**label_colors(label_array), **(label_palette or {})}}
    markers = source_markers(source_array)
    seen = set(training_sources) if training_sources else None
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.2), layout="constrained")
    for axis, column, values in ((axes[0], "source", source_array), (axes[1], "label", label_array)):
        for name in sorted(set(values)):
            part = values == name
            tag = "" if column != "source" or seen is None else (" seen" if name in seen else " unseen")
            axis.scatter(x[part], y[part], s=14, alpha=0.85, color=palettes[column][name], linewidths=0,
                         marker=markers.get(name, "o") if column == "source" else "o", label=f"{name} ({tag.strip() + ', ' if tag else ''}{int(part.sum())})")
        axis.set_title(f"{EMBEDDING_METHODS.get(method, method)} coloured by {column}")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncols=min(3, len(set(values))), frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_embedding(table: pd.DataFrame, path: str | Path, title: str = "", training_sources: Sequence[str] | None = None, method: str = "tsne") -> Path:
    """Two-panel scatter (by ``source``, by ``label``) of a table with ``x``, ``y``; written atomically as PNG."""
    import matplotlib.pyplot as plt

    from covidcxr.io.atomic import atomic_path

    figure = embedding_figure(table["x"].to_numpy(), table["y"].to_numpy(), table["source"].astype(str).tolist(), table["label"].astype(str).tolist(),
                              training_sources=training_sources, title=title, method=method)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150)
    plt.close(figure)
    return path
