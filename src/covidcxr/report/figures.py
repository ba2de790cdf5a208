"""The report's figures: matplotlib (Agg, no display), embedded in the page and exported for a journal.

Every function draws from the numbers :func:`covidcxr.report.results.collect_results`
collected (never from the raw files), so a figure shows exactly what ``results.json``
holds, and returns a matplotlib ``Figure``; :func:`render` turns it into the page's PNG
data URI (100 dpi, a page of a few hundred kB) and, given a folder, writes the same figure
as SVG and as 300-dpi PNG beside the page (``report_figures/``) for a manuscript. No file
carries metadata (matplotlib's would carry its URL and a date).

Colours come from :mod:`covidcxr.report.palette` through ``results["palette"]``: a source,
a label, or the pooled / seen / unseen group has the same colour on every figure.
:func:`text_overlaps` lists overlapping labels of a figure (the tests require none).

Example::

    >>> from covidcxr.report.figures import render, roc_figure
    >>> run = results["runs"][0]                                         # doctest: +SKIP
    >>> out = render(roc_figure(run["roc"], results["palette"]), "roc", Path("report_figures"))  # doctest: +SKIP
    >>> out["uri"].startswith("data:image/png;base64,"), out["svg"]      # doctest: +SKIP
    (True, 'roc.svg')
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from covidcxr.io.atomic import atomic_path  # noqa: E402
from covidcxr.report.palette import NO_DATA, ROLE_COLORS, VARIANT_COLORS, label_colors, source_colors  # noqa: E402

__all__ = [
    "DPI",
    "EXPORT_DPI",
    "audit_figure",
    "calibration_figure",
    "composition_figure",
    "embedding_figure",
    "figure_data_uri",
    "heatmap_figure",
    "image_file_data_uri",
    "pr_figure",
    "render",
    "roc_figure",
    "text_overlaps",
]

#: resolution of the embedded figures: sharp on a laptop screen, ~50-150 kB per figure
DPI = 100
#: resolution of the exported PNG (journals ask for at least 300 dpi for line art with text)
EXPORT_DPI = 300
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "font.family": "DejaVu Sans",
    "svg.hashsalt": "covidcxr",  # reproducible SVG ids
}


def _png_bytes(fig: Any, dpi: int, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buffer.getvalue()


def figure_data_uri(fig: Any, dpi: int = DPI) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it."""
    try:
        return "data:image/png;base64," + base64.b64encode(_png_bytes(fig, dpi)).decode("ascii")
    finally:
        plt.close(fig)


def render(fig: Any, name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The page's data URI of a figure and, with ``directory``, its SVG and 300-dpi PNG files.

    The layout (constrained) is computed once and then frozen, so the three outputs show the
    same picture and the layout's text measuring is not paid three times.

    Args:
        fig: a matplotlib Figure (closed here), or None.
        name: the files' stem (``name.svg``, ``name.png``), a plain file name.
        directory: where the files go (created); None writes no file.

    Returns:
        ``{"uri", "svg", "png"}`` (file names relative to ``directory``; None when not
        written), or ``{"uri": None, ...}`` for ``fig=None``.
    """
    out: dict[str, Any] = {"uri": None, "svg": None, "png": None}
    if fig is None:
        return out
    try:
        with plt.rc_context(_STYLE):
            fig.canvas.draw()  # runs the layout engine once
            fig.set_layout_engine("none")
            if directory is not None:
                folder = Path(directory)
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(folder / f"{name}.svg") as tmp:
                    fig.savefig(tmp, format="svg", metadata={"Date": None, "Creator": None})
                with atomic_path(folder / f"{name}.png") as tmp:
                    Path(tmp).write_bytes(_png_bytes(fig, EXPORT_DPI, tight=False))
                out.update(svg=f"{name}.svg", png=f"{name}.png")
            out["uri"] = "data:image/png;base64," + base64.b64encode(_png_bytes(fig, DPI, tight=False)).decode("ascii")
    finally:
        plt.close(fig)
    return out


def text_overlaps(fig: Any, tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of a figure whose boxes overlap (by more than ``tolerance`` px).

    Tick labels, titles, axis labels, annotations and legend entries are all checked; a
    figure a journal accepts returns ``[]``.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = set()  # labels of ticks outside the view limits: matplotlib keeps them but does not draw them
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-6
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - span <= tick.get_loc() <= high + span:
                    hidden.update({id(tick.label1), id(tick.label2)})
    boxes = []
    for text in fig.findobj(Text):
        if id(text) in hidden or not text.get_visible() or not text.get_text().strip() or (text.axes is not None and not text.axes.get_visible()):
            continue
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            boxes.append((text.get_text(), box.expanded(1.0, 1.0).padded(-tolerance)))
    out = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if box_a.overlaps(box_b):
                out.append((a, b))
    return out


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


def _palette(palette: Mapping[str, Any] | None, sources: Sequence[str] = (), labels: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """The report's palette, completed for names it lacks (a figure drawn on its own)."""
    palette = palette or {}
    out = {"sources": dict(palette.get("sources") or {}), "labels": dict(palette.get("labels") or {}), "roles": dict(palette.get("roles") or ROLE_COLORS)}
    missing = [s for s in sources if s not in out["sources"]]
    if missing:
        out["sources"].update(source_colors(missing) if not out["sources"] else {m: NO_DATA for m in missing})
    missing_labels = [lbl for lbl in labels if lbl not in out["labels"]]
    out["labels"].update(label_colors(missing_labels))
    return out


def _group_color(entry: Mapping[str, Any], palette: Mapping[str, Mapping[str, str]]) -> str:
    """Pooled groups in their role colour (all: black, seen: blue, unseen: purple), a source in its own."""
    if entry.get("pooled"):
        role = "pooled" if entry.get("seen") is None else ("seen" if entry["seen"] else "unseen")
        return palette["roles"][role]
    return palette["sources"].get(str(entry["name"]), NO_DATA)


def _tag(entry: Mapping[str, Any]) -> str:
    if entry.get("pooled") or entry.get("seen") is None:
        return ""
    return " (seen)" if entry["seen"] else " (unseen)"


def _short(text: str, width: int = 26) -> str:
    return textwrap.shorten(str(text), width=width, placeholder="…")


def _ci_text(estimate: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    if estimate is None:
        return "n/a"
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return f"{estimate:.{digits}f}"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _m(metric: Any, digits: int = 2) -> str:
    if not isinstance(metric, Mapping):
        return "n/a"
    return _ci_text(metric.get("estimate"), metric.get("low"), metric.get("high"), digits)


def _grid(n: int, columns: int, width: float = 3.0, height: float = 3.1) -> tuple[Any, np.ndarray]:
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes


def _box(ax: Any, text: str) -> None:
    """The panel's numbers, under its x-axis label: never on top of a curve or a marker."""
    ax.annotate(text, xy=(0.0, 0.0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -5), textcoords="offset points",
                ha="left", va="top", fontsize=7.5, linespacing=1.3, annotation_clip=False)


def _counts(entry: Mapping[str, Any]) -> str:
    return f"{entry['n_images']} images · {entry['n_patients']} patients"


def _one_class(ax: Any, entry: Mapping[str, Any], what: str) -> None:
    ax.text(0.5, 0.62, f"no {what}:\none class only", ha="center", va="center", fontsize=9, color="#555555", transform=ax.transAxes)
    ax.text(0.5, 0.38, f"{entry['n_positive']} positive · {entry['n_negative']} negative\n{_counts(entry)}", ha="center", va="center", fontsize=7.5, color="#555555", transform=ax.transAxes)


def _unit_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def roc_figure(curves: Sequence[Mapping[str, Any]], palette: Mapping[str, Any] | None = None, positive_class: str = "positive", columns: int = 4) -> Any:
    """Small multiples of ROC curves with their patient-bootstrap 95% bands and the operating point.

    The operating point (the run's threshold) is a white-filled circle on each curve, its
    sensitivity and specificity with their 95% CIs in the panel's box.

    Args:
        curves: ``results["runs"][i]["roc"]`` entries (name, seen, fpr, tpr, band, auc,
            auc_low, auc_high, operating_point, n_images, n_patients; or a ``note``).
        palette: ``results["palette"]``.
        positive_class: the positive class's name (axis labels).
        columns: panels per row.

    Returns:
        A matplotlib Figure, or None when there are no curves.
    """
    if not curves:
        return None
    colors = _palette(palette, [c["name"] for c in curves if not c.get("pooled")])
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(curves), columns, height=4.0)
        for ax, curve in zip(axes.ravel(), curves):
            color = _group_color(curve, colors)
            ax.set_title(_short(f"{curve['name']}{_tag(curve)}", 30))
            ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
            _unit_axes(ax, "1 − specificity", f"sensitivity ({_short(positive_class, 12)})")
            if curve.get("fpr") is None:
                _one_class(ax, curve, "ROC curve")
                continue
            band = curve["band"]
            low = np.array([np.nan if v is None else v for v in band["tpr_low"]], dtype=float)
            high = np.array([np.nan if v is None else v for v in band["tpr_high"]], dtype=float)
            ax.fill_between(band["fpr"], low, high, step="post", color=color, alpha=0.2, lw=0)
            ax.plot(curve["fpr"], curve["tpr"], color=color, lw=1.8)
            lines = [f"AUC {_ci_text(curve['auc'], curve['auc_low'], curve['auc_high'])}"]
            op = curve.get("operating_point")
            if op:
                ax.plot([op["fpr"]], [op["tpr"]], marker="o", ms=6.5, mfc="white", mec="black", mew=1.4, ls="none", zorder=5)
                lines += [f"○ threshold {op['threshold']:.2f}:", f"  sens {_m(op['sensitivity'])}", f"  spec {_m(op['specificity'])}"]
            _box(ax, "\n".join([*lines, _counts(curve)]))
        return fig


def pr_figure(curves: Sequence[Mapping[str, Any]], palette: Mapping[str, Any] | None = None, positive_class: str = "positive", columns: int = 4) -> Any:
    """Small multiples of precision–recall curves, with the prevalence (a random score's precision) dashed.

    Args:
        curves: ``results["runs"][i]["pr"]`` entries (name, seen, precision, recall,
            average_precision, prevalence, counts; or a ``note``).
        palette: ``results["palette"]``.

    Returns:
        A matplotlib Figure, or None when there are no curves.
    """
    if not curves:
        return None
    colors = _palette(palette, [c["name"] for c in curves if not c.get("pooled")])
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(curves), columns, height=3.6)
        for ax, curve in zip(axes.ravel(), curves):
            color = _group_color(curve, colors)
            ax.set_title(_short(f"{curve['name']}{_tag(curve)}", 30))
            _unit_axes(ax, f"recall (sensitivity, {_short(positive_class, 12)})", "precision (PPV)")
            if curve.get("precision") is None:
                _one_class(ax, curve, "PR curve")
                continue
            ax.axhline(curve["prevalence"], color="#777777", lw=0.9, ls="--")
            ax.step(curve["recall"], curve["precision"], where="post", color=color, lw=1.8)
            _box(ax, f"AP {_m(curve['average_precision'], 3)}\nprevalence {curve['prevalence']:.2f} (dashed)\n{_counts(curve)}")
        return fig


def calibration_figure(calibration: Mapping[str, Any] | None, palette: Mapping[str, Any] | None = None) -> Any:
    """Reliability diagrams (Guo et al. 2017, Fig. 1) of the pooled, seen and unseen test images.

    Per panel: the fraction positive against the mean predicted probability per bin (marker
    area ∝ images in the bin), the diagonal of perfect calibration, the images per bin as
    bars along the bottom, and the Brier score and ECE with their patient-bootstrap 95% CIs.
    A temperature fitted on validation data adds its curve (dotted) to the first panel.

    Args:
        calibration: ``results["runs"][i]["calibration"]``.
        palette: ``results["palette"]``.

    Returns:
        A matplotlib Figure, or None without calibration groups.
    """
    if not calibration or not calibration.get("groups"):
        return None
    groups = calibration["groups"]
    colors = _palette(palette)
    temperature = calibration.get("temperature") or {}
    with plt.rc_context(_STYLE):
        fig, axes = _grid(len(groups), 3, width=3.2, height=4.1)
        for k, (ax, group) in enumerate(zip(axes.ravel(), groups)):
            color = _group_color(group, colors)
            curve = group["curve"]
            ax.set_title(_short(group["name"], 30))
            ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
            _unit_axes(ax, "mean predicted probability", "fraction positive")
            counts = np.asarray(curve["count"], dtype=float)
            edges = np.asarray(curve["edges"], dtype=float)
            bins = np.asarray(curve["bin"], dtype=int)
            if counts.size:
                # images per bin, drawn in the bottom fifth of the panel (scaled to the fullest bin)
                ax.bar(edges[bins], 0.18 * counts / counts.max(), width=np.diff(edges)[bins], align="edge", color=color, alpha=0.2, lw=0)
            ax.plot(curve["prob_pred"], curve["prob_true"], color=color, lw=1.4)
            ax.scatter(curve["prob_pred"], curve["prob_true"], s=12 + 60 * counts / max(counts.max(), 1), color=color, zorder=4, edgecolors="white", linewidths=0.5)
            lines = [f"Brier {_m(group['brier'], 3)}", f"ECE {_m(group['ece'], 3)}"]
            if k == 0 and temperature.get("temperature") and temperature.get("curve"):
                scaled = temperature["curve"]
                ax.plot(scaled["prob_pred"], scaled["prob_true"], color=color, lw=1.2, ls=":", marker="s", ms=3)
                lines.append(f"T={temperature['temperature']:.2f} (val.), dotted:")
                lines.append(f"  ECE {_m(temperature['ece'], 3)}")
            _box(ax, "\n".join([*lines, _counts(group)]))
        return fig


def heatmap_figure(cross_source: Mapping[str, Any] | None) -> Any:
    """Train × test AUC heatmap (rows: runs with their training sources; columns: test sources).

    Cells a run trained on are outlined and marked "seen"; empty cells (no test images of
    that source, or one class only) are grey. The colour map is ``cividis`` (perceptually
    uniform and readable with colour-vision deficiency; Nuñez et al. 2018, PLoS ONE 13:e0199239).

    Args:
        cross_source: ``results["cross_source"]`` (rows, columns, auc, table).

    Returns:
        A matplotlib Figure, or None without data.
    """
    if not cross_source or not cross_source.get("rows") or not cross_source.get("columns"):
        return None
    rows, columns = cross_source["rows"], cross_source["columns"]
    values = np.array([[np.nan if v is None else v for v in row] for row in cross_source["auc"]], dtype=float)
    seen = {(t["training"], t["test_source"]) for t in cross_source.get("table", []) if t.get("seen")}
    present = {(t["training"], t["test_source"]): t for t in cross_source.get("table", [])}
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(max(4.8, 1.15 * len(columns) + 3.4), max(2.6, 0.62 * len(rows) + 1.6)), layout="constrained")
        cmap = matplotlib.colormaps["cividis"].with_extremes(bad="#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.4, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), labels=[_short(c, 18) for c in columns], rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), labels=[_short(r, 40) for r in rows])
        ax.set_xlabel("test source")
        for i, row in enumerate(rows):
            for j, column in enumerate(columns):
                value = values[i, j]
                cell = present.get((row, column))
                if math.isnan(value):
                    ax.text(j, i, "—" if cell is None else "one class", ha="center", va="center", fontsize=8, color="#777777")
                    continue
                mark = "seen" if (row, column) in seen else "unseen"
                ink = "black" if value > 0.75 else "white"  # cividis is dark below ~0.75 on this scale
                ax.text(j, i, f"{value:.2f}\n{mark}", ha="center", va="center", fontsize=8.5, color=ink)
                if (row, column) in seen:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#d55e00", lw=2.0))
        colorbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        colorbar.set_label("AUC")
        ax.set_title("AUC by training run (rows) and test source (columns)")
        return fig


def composition_figure(composition: Mapping[str, Any], palette: Mapping[str, Any] | None = None, training_sources: Sequence[str] | None = None) -> Any:
    """Images per source, stacked by label, one panel per split; unseen sources marked.

    Args:
        composition: ``results["runs"][i]["composition"]``.
        palette: ``results["palette"]`` (label colours).
        training_sources: sources the model trained on (others are tagged "unseen").

    Returns:
        A matplotlib Figure, or None when the composition is unavailable.
    """
    if not composition.get("available") or not composition.get("rows"):
        return None
    splits = composition["splits"]
    sources = sorted({r["source"] for r in composition["rows"]})
    order = ["covid", "pneumonia", "normal", "other"]
    labels = sorted({r["label"] for r in composition["rows"]}, key=lambda x: (order.index(x) if x in order else len(order), x))
    colors = _palette(palette, sources, labels)["labels"]
    counts = {(r["source"], r["label"], s): r[s]["images"] for r in composition["rows"] for s in splits}
    seen = set(training_sources) if training_sources else None
    ticks = [s if seen is None or s in seen else f"{s} (unseen)" for s in sources]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(splits), figsize=(2.9 * len(splits) + 1.9, 0.4 * len(sources) + 1.5), sharey=True, squeeze=False, layout="constrained")
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
            ax.set_xlim(0, max(left.max() * 1.3, 1))
            ax.grid(axis="y", visible=False)
        axes[0][0].set_yticks(range(len(sources)), labels=[_short(t, 28) for t in ticks])
        axes[0][0].invert_yaxis()
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center", frameon=False, title="label")
        return fig


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


def audit_figure(audit: Mapping[str, Any]) -> Any:
    """The audit's numbers at a glance: source probe and lung ablation, with 95% CIs.

    Left: balanced accuracy of a linear probe predicting the *source* from the model's
    embedding, on the whole image, with the lungs blanked and with the lungs only,
    against chance. Right: the model's test AUC on the same three variants (a model that
    reads the lungs loses its AUC when they are blanked, not when the rest is).

    Args:
        audit: ``results["runs"][i]["audit"]`` (status "audited").

    Returns:
        A matplotlib Figure, or None when neither part is in the audit.
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
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 2.9), squeeze=False, layout="constrained")
        for ax, (title, xlabel, rows, reference, reference_label) in zip(axes[0], panels):
            labels = [r[0] for r in rows]
            est = np.array([r[1][0] for r in rows])
            low = np.array([r[1][1] for r in rows])
            high = np.array([r[1][2] for r in rows])
            y = np.arange(len(rows))
            ax.barh(y, est, color=[VARIANT_COLORS[label] for label in labels], height=0.55, alpha=0.9)
            ax.errorbar(est, y, xerr=[est - low, high - est], fmt="none", ecolor="black", capsize=3, lw=1)
            for k, value in enumerate(est):
                ax.text(min(high[k] + 0.02, 1.0), k, f"{value:.2f}", va="center", fontsize=8)
            if reference is not None:
                ax.axvline(float(reference), color="#555555", ls="--", lw=1)
                # below the axis (the y axis is inverted: above the bottom bar's lower edge), clear of the bars
                ax.text(float(reference), len(rows) - 0.5, f" {reference_label}", fontsize=7.5, color="#555555", ha="left", va="bottom")
            ax.set_yticks(y, labels=labels)
            ax.set_xlim(0, 1.12)
            ax.set_xlabel(xlabel)
            ax.set_ylim(len(rows) - 0.5 + 0.45, -0.5)
            ax.set_title(title)
            ax.grid(axis="y", visible=False)
        return fig


def embedding_figure(points: Mapping[str, Any] | None, palette: Mapping[str, Any] | None = None, training_sources: Sequence[str] | None = None, title: str = "") -> Any:
    """The audit's t-SNE (or UMAP) map coloured by source and by label, in the report's palette.

    Args:
        points: ``results["runs"][i]["audit"]["embedding_points"]`` (x, y, source, label).
        palette: ``results["palette"]``.
        training_sources: sources the model trained on (others are tagged "unseen").

    Returns:
        A matplotlib Figure (:func:`covidcxr.audit.embedding.embedding_figure`), or None.
    """
    if not points or not points.get("x"):
        return None
    from covidcxr.audit.embedding import embedding_figure as draw

    colors = _palette(palette, sorted(set(points["source"])), sorted(set(points["label"])))
    with plt.rc_context(_STYLE):
        return draw(np.asarray(points["x"], dtype=float), np.asarray(points["y"], dtype=float), points["source"], points["label"],
                    source_palette=colors["sources"], label_palette=colors["labels"], training_sources=training_sources, title=title,
                    method=str(points.get("method") or "tsne"))
