"""The report's figures: matplotlib (Agg, no display) rendered to embedded PNG data URIs.

Every function draws from the numbers :func:`covidcxr.report.results.collect_results`
collected (never from the raw files), so a figure shows exactly what ``results.json``
holds. Figures are PNG at a modest DPI (a page of a few hundred kB, not megabytes), with
no metadata (matplotlib's PNG text chunks would otherwise carry its URL).

Example::

    >>> from covidcxr.report.figures import roc_figure
    >>> uri = roc_figure(results["runs"][0]["roc"], "covid")            # doctest: +SKIP
    >>> uri.startswith("data:image/png;base64,")                        # doctest: +SKIP
    True
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = [
    "DPI",
    "audit_figure",
    "composition_figure",
    "figure_data_uri",
    "heatmap_figure",
    "image_file_data_uri",
    "roc_figure",
]

#: resolution of the embedded figures: sharp on a laptop screen, ~50-150 kB per figure
DPI = 100
SEEN_COLOR = "#1f5fa8"
UNSEEN_COLOR = "#c2410c"
POOLED_COLOR = "#222222"
LABEL_COLORS = {"covid": "#c0392b", "pneumonia": "#e08e0b", "normal": "#2e8b57", "other": "#8a8a8a"}
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "font.family": "DejaVu Sans",
}


def figure_data_uri(fig: Any, dpi: int = DPI) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_file_data_uri(path: str | Path, max_width: int = 1400, max_bytes: int = 600_000) -> str:
    """An image file (e.g. the audit's ``gallery.png``) as a data URI, downscaled to fit.

    Images wider than ``max_width`` are resized (Lanczos); a PNG still larger than
    ``max_bytes`` is re-encoded as JPEG (quality 85), so one saliency gallery cannot make
    the page tens of megabytes.

    Raises:
        OSError: the file is missing or not an image PIL can read.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGBA") if opened.mode in ("P", "LA") else opened.copy()
    if image.width > max_width:
        height = max(1, round(image.height * max_width / image.width))
        image = image.resize((max_width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() <= max_bytes:
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(curve: Mapping[str, Any]) -> str:
    if curve.get("seen") is None:
        return POOLED_COLOR
    return SEEN_COLOR if curve["seen"] else UNSEEN_COLOR


def _ci_text(estimate: float | None, low: float | None, high: float | None) -> str:
    if estimate is None:
        return "n/a"
    if low is None or high is None:
        return f"{estimate:.3f}"
    return f"{estimate:.3f} [{low:.3f}, {high:.3f}]"


def roc_figure(curves: Sequence[Mapping[str, Any]], positive_class: str = "positive", columns: int = 4) -> str | None:
    """Small multiples of ROC curves with their patient-bootstrap 95% bands.

    Args:
        curves: ``results["runs"][i]["roc"]`` entries (name, seen, fpr, tpr, band, auc,
            auc_low, auc_high, n_images, n_patients; or a ``note`` for one-class groups).
        positive_class: the positive class's name (axis labels).
        columns: panels per row.

    Returns:
        A PNG data URI, or None when there are no curves.
    """
    if not curves:
        return None
    n = len(curves)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.05 * rows), squeeze=False)
        for ax in axes.ravel()[n:]:
            ax.set_visible(False)
        for ax, curve in zip(axes.ravel(), curves):
            color = _color(curve)
            tag = "" if curve.get("seen") is None else (" · seen" if curve["seen"] else " · unseen")
            ax.set_title(f"{curve['name']}{tag}", color=color, fontsize=10)
            ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
            ax.set_xlim(-0.01, 1.01)
            ax.set_ylim(-0.01, 1.01)
            ax.set_aspect("equal")
            ax.set_xlabel("1 − specificity (FPR)")
            ax.set_ylabel(f"sensitivity ({positive_class})")
            counts = f"{curve['n_images']} images · {curve['n_patients']} patients"
            if curve.get("fpr") is None:
                ax.text(0.5, 0.55, "no ROC curve:\none class only", ha="center", va="center", fontsize=10, color="#555555")
                ax.text(0.5, 0.35, f"{curve['n_positive']} positive · {curve['n_negative']} negative\n{counts}", ha="center", va="center", fontsize=8, color="#555555")
                continue
            band = curve["band"]
            low = np.array([np.nan if v is None else v for v in band["tpr_low"]], dtype=float)
            high = np.array([np.nan if v is None else v for v in band["tpr_high"]], dtype=float)
            ax.fill_between(band["fpr"], low, high, step="post", color=color, alpha=0.18, lw=0, label="95% band (patients resampled)")
            ax.plot(curve["fpr"], curve["tpr"], color=color, lw=1.8)
            ax.text(0.97, 0.05, f"AUC {_ci_text(curve['auc'], curve['auc_low'], curve['auc_high'])}\n{counts}",
                    ha="right", va="bottom", fontsize=8, transform=ax.transAxes,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#cccccc", "alpha": 0.9})
        fig.tight_layout()
        return figure_data_uri(fig)


def heatmap_figure(cross_source: Mapping[str, Any] | None) -> str | None:
    """Train × test AUC heatmap (rows: runs with their training sources; columns: test sources).

    Cells a run trained on are outlined and marked "seen"; empty cells (no test images of
    that source, or one class only) are grey.

    Args:
        cross_source: ``results["cross_source"]`` (rows, columns, auc, table).

    Returns:
        A PNG data URI, or None without data.
    """
    if not cross_source or not cross_source.get("rows") or not cross_source.get("columns"):
        return None
    rows, columns = cross_source["rows"], cross_source["columns"]
    values = np.array([[np.nan if v is None else v for v in row] for row in cross_source["auc"]], dtype=float)
    seen = {(t["training"], t["test_source"]) for t in cross_source.get("table", []) if t.get("seen")}
    present = {(t["training"], t["test_source"]): t for t in cross_source.get("table", [])}
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.15 * len(columns) + 3.2), max(2.4, 0.62 * len(rows) + 1.4)))
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.4, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), labels=rows)
        ax.set_xlabel("test source")
        for i, row in enumerate(rows):
            for j, column in enumerate(columns):
                value = values[i, j]
                cell = present.get((row, column))
                if math.isnan(value):
                    text = "—" if cell is None else "one class"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="#777777")
                    continue
                mark = "\nseen" if (row, column) in seen else "\nunseen"
                ax.text(j, i, f"{value:.2f}{mark}", ha="center", va="center", fontsize=8.5, color="black")
                if (row, column) in seen:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#1f2937", lw=1.6))
        colorbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        colorbar.set_label("AUC")
        ax.set_title("AUC by training run (rows) and test source (columns)")
        fig.tight_layout()
        return figure_data_uri(fig)


def composition_figure(composition: Mapping[str, Any]) -> str | None:
    """Images per source, stacked by label, one panel per split.

    Args:
        composition: ``results["runs"][i]["composition"]``.

    Returns:
        A PNG data URI, or None when the composition is unavailable.
    """
    if not composition.get("available") or not composition.get("rows"):
        return None
    splits = composition["splits"]
    sources = sorted({r["source"] for r in composition["rows"]})
    labels = sorted({r["label"] for r in composition["rows"]}, key=lambda x: (x not in LABEL_COLORS, list(LABEL_COLORS).index(x) if x in LABEL_COLORS else 0, x))
    extra = iter(matplotlib.colormaps["tab10"].colors)
    colors = {label: LABEL_COLORS.get(label) or next(extra) for label in labels}
    counts = {(r["source"], r["label"], s): r[s]["images"] for r in composition["rows"] for s in splits}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(splits), figsize=(3.2 * len(splits) + 0.8, 0.38 * len(sources) + 1.3), sharey=True, squeeze=False)
        for ax, split in zip(axes[0], splits):
            left = np.zeros(len(sources))
            for label in labels:
                widths = np.array([counts.get((s, label, split), 0) for s in sources], dtype=float)
                ax.barh(range(len(sources)), widths, left=left, color=colors[label], label=label, height=0.7)
                left += widths
            for k, total in enumerate(left):
                if total:
                    ax.text(total, k, f" {int(total)}", va="center", fontsize=8)
            ax.set_title(split)
            ax.set_xlabel("images")
            ax.set_xlim(0, max(left.max() * 1.18, 1))
            ax.grid(axis="y", visible=False)
        axes[0][0].set_yticks(range(len(sources)), labels=sources)
        axes[0][0].invert_yaxis()
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(handles, names, loc="center left", frameon=False, bbox_to_anchor=(1.0, 0.5), title="label")
        return figure_data_uri(fig)


def _estimate(block: Any, key: str) -> tuple[float, float, float] | None:
    if not isinstance(block, Mapping) or "skipped" in block:
        return None
    metric = block.get(key)
    if isinstance(metric, Mapping) and metric.get("estimate") is not None:
        low = metric.get("low")
        high = metric.get("high")
        est = float(metric["estimate"])
        return est, float(low if low is not None else est), float(high if high is not None else est)
    return None


_VARIANTS = (("full", "whole image"), ("original", "whole image"), ("lungs_blanked", "lungs blanked"), ("lungs_only", "lungs only"))
_VARIANT_COLORS = {"whole image": "#4b5563", "lungs blanked": "#b91c1c", "lungs only": "#15803d"}


def audit_figure(audit: Mapping[str, Any]) -> str | None:
    """The audit's numbers at a glance: source probe and lung ablation, with 95% CIs.

    Left: balanced accuracy of a linear probe predicting the *source* from the model's
    embedding, on the whole image, with the lungs blanked and with the lungs only,
    against chance. Right: the model's test AUC on the same three variants (a model that
    reads the lungs loses its AUC when they are blanked, not when the rest is).

    Args:
        audit: ``results["runs"][i]["audit"]`` (status "audited").

    Returns:
        A PNG data URI, or None when neither part is in the audit.
    """
    probe = audit.get("source_probe") or {}
    ablation = audit.get("ablation") or {}
    panels = []
    probe_rows = [(label, _estimate(probe.get(key), "balanced_accuracy")) for key, label in _VARIANTS if key in probe]
    probe_rows = [(label, v) for label, v in probe_rows if v is not None]
    if probe_rows:
        chance = next((probe[k].get("chance") for k in probe if isinstance(probe[k], Mapping) and probe[k].get("chance") is not None), None)
        panels.append(("Can the source be read off the embedding?", "balanced accuracy of a source probe", probe_rows, chance, "chance"))
    ablation_rows = [(label, _estimate(ablation.get(key), "auc")) for key, label in _VARIANTS if key in ablation]
    ablation_rows = [(label, v) for label, v in ablation_rows if v is not None]
    if ablation_rows:
        panels.append(("Does the AUC need the lungs?", "test AUC", ablation_rows, 0.5, "chance (0.5)"))
    if not panels:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 2.6), squeeze=False)
        for ax, (title, xlabel, rows, reference, reference_label) in zip(axes[0], panels):
            labels = [r[0] for r in rows]
            est = np.array([r[1][0] for r in rows])
            low = np.array([r[1][1] for r in rows])
            high = np.array([r[1][2] for r in rows])
            y = np.arange(len(rows))
            ax.barh(y, est, color=[_VARIANT_COLORS[label] for label in labels], height=0.55, alpha=0.85)
            ax.errorbar(est, y, xerr=[est - low, high - est], fmt="none", ecolor="black", capsize=3, lw=1)
            for k, value in enumerate(est):
                ax.text(min(high[k] + 0.02, 1.0), k, f"{value:.2f}", va="center", fontsize=8)
            if reference is not None:
                ax.axvline(float(reference), color="#555555", ls="--", lw=1)
                # above the top bar (the y axis is inverted), clear of the tick labels
                ax.text(float(reference), -0.5, f"{reference_label}\n", fontsize=7.5, color="#555555", ha="center", va="bottom")
            ax.set_yticks(y, labels=labels)
            ax.set_xlim(0, 1.1)
            ax.set_xlabel(xlabel)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_title(title, pad=16)
            ax.grid(axis="y", visible=False)
        fig.tight_layout()
        return figure_data_uri(fig)
