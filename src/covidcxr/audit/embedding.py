"""Embedding map: a 2-D t-SNE of the model's embeddings, coloured by source and by label.

Tartaglione et al. (2020, Fig. 4) plot the t-SNE of their encoder's features and find the
images grouped by the collection they came from rather than by diagnosis. The same
picture, for any run: scikit-learn's `TSNE` (exact for small sets, Barnes-Hut otherwise)
on the PCA-reduced embeddings, and a two-panel figure — by source on the left, by label on
the right. Two panels that look alike mean source and label are entangled in what the
model learned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError

__all__ = ["plot_embedding", "tsne_map"]


def tsne_map(embeddings: np.ndarray, seed: int = 0, max_components: int = 50) -> np.ndarray:
    """``(N, D)`` embeddings -> ``(N, 2)`` t-SNE coordinates (PCA to ``max_components`` first).

    Perplexity is ``min(30, (N - 1) / 3)`` (t-SNE needs perplexity < N).

    Raises:
        CovidCXRError: fewer than 5 images.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 5:
        raise CovidCXRError(f"t-SNE needs (N, D) embeddings with N >= 5; got shape {x.shape}")
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    components = int(min(max_components, x.shape[1], len(x) - 1))
    if components < x.shape[1]:
        x = PCA(n_components=components, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x).astype(np.float32)


def plot_embedding(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Two-panel scatter (by ``source``, by ``label``) of a table with ``x``, ``y``; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidcxr.io.atomic import atomic_path

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=90)
    for axis, column in zip(axes, ("source", "label")):
        groups = sorted(table[column].astype(str).unique())
        colours = plt.get_cmap("tab10")
        markers = "osD^v<>pXh"
        for k, name in enumerate(groups):
            part = table[table[column].astype(str) == name]
            axis.scatter(part["x"], part["y"], s=14, alpha=0.8, color=colours(k % 10), marker=markers[k % len(markers)], label=f"{name} ({len(part)})", linewidths=0)
        axis.set_title(f"t-SNE coloured by {column}")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=7, loc="best", frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
