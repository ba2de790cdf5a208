"""The report page: one self-contained HTML file (Jinja2, autoescaped) and its ``results.json``.

:func:`write_report` is the whole of ``covidcxr report``: collect every number
(:func:`covidcxr.report.results.collect_results`), draw the figures from those numbers
(:mod:`covidcxr.report.figures`), render ``templates/report.html.j2`` and write the page
and the JSON atomically. The page has no external reference (no CDN, no web font, no
link to fetch): figures are embedded as base64 PNG, the style sheet is inline, and it
reads the same offline, printed or attached to an e-mail.

Everything that comes from data (source names, finding texts, the config) is escaped by
Jinja2's autoescaping; nothing is marked safe except the figures' data URIs, which this
module makes itself.

Example::

    >>> from covidcxr.report.html import write_report
    >>> paths = write_report(["runs/small_shared"], "report.html")      # doctest: +SKIP
    >>> paths.html, paths.json                                           # doctest: +SKIP
    (PosixPath('report.html'), PosixPath('results.json'))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text
from covidcxr.report import figures as fig
from covidcxr.report.results import collect_results, write_results_json

__all__ = ["ReportPaths", "build_figures", "render_html", "write_report"]

TEMPLATE = "report.html.j2"


@dataclass
class ReportPaths:
    """Where a report went, and what it holds.

    Attributes:
        html: the page.
        json: ``results.json`` (every number on the page, and the exported figures' files).
        results: the collected numbers (what the JSON holds).
        html_bytes: the page's size.
    """

    html: Path
    json: Path
    results: dict[str, Any]
    html_bytes: int
    figures: Path | None = None


# ----------------------------------------------------------------------------- formatting filters


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt_num(value: Any, digits: int = 3) -> str:
    """``0.93284`` -> ``"0.933"``; ints with thousands separators; None/NaN -> ``"–"``."""
    if _is_missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_dor(value: Any) -> str:
    """Diagnostic odds ratios span orders of magnitude: 3 significant digits."""
    if _is_missing(value):
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def fmt_ci(metric: Any, digits: int = 3, dor: bool = False) -> str:
    """``{low, high}`` -> ``"0.900–0.961"`` ("" when either end is missing)."""
    if not isinstance(metric, Mapping) or _is_missing(metric.get("low")) or _is_missing(metric.get("high")):
        return ""
    f = fmt_dor if dor else (lambda v: fmt_num(v, digits))
    return f"{f(metric['low'])}–{f(metric['high'])}"


def fmt_p(value: Any) -> str:
    """p-values: ``"< 0.001"`` below a thousandth, else 2 significant digits."""
    if _is_missing(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.2g}"


def fmt_pct(value: Any) -> str:
    return "–" if _is_missing(value) else f"{100 * value:.0f}%"


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("covidcxr.report", "templates"),
        autoescape=True,  # every value from data is escaped, whatever the template's name
        undefined=StrictUndefined,  # a typo in the template fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=fmt_num, dor=fmt_dor, ci=fmt_ci, p=fmt_p, pct=fmt_pct)
    return env


# ----------------------------------------------------------------------------- figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()[:40] or "run"


_CAPTIONS = {
    "roc": "ROC curve per group of test images with the patient-bootstrap 95% band; circle: the operating point (the run's threshold) with its sensitivity and specificity [95% CI].",
    "pr": "Precision-recall curve per group of test images; dashed: the prevalence (a random score's precision); AP: average precision [95% CI].",
    "calibration": "Reliability diagram: fraction positive against the mean predicted probability in 10 equal-width bins (marker area and bottom bars: images per bin), with the Brier score and ECE [95% CI].",
    "heatmap": "Test AUC of each run (rows) on each test source (columns); outlined cells: sources the run trained on.",
    "composition": "Images per source and label in each split, unseen test sources included.",
    "audit": "Source probe (balanced accuracy, 95% CI) and lung ablation (test AUC, 95% CI).",
    "embedding": "t-SNE of the model's image embeddings, coloured by source and by label.",
    "gallery": "Grad-CAM overlays with the lung contour; each caption gives the source, the true label, the probability, the decision at the run's threshold and whether it is right.",
}


def build_figures(results: Mapping[str, Any], directory: str | Path | None = None, prefix: str = "") -> dict[str, Any]:
    """Every figure of the page as data URIs drawn from ``results``, and with ``directory`` as files.

    Args:
        results: :func:`covidcxr.report.results.collect_results`'s dict.
        directory: where each figure is also written as SVG and 300-dpi PNG (None: nowhere).
        prefix: the folder name the HTML uses to reach ``directory`` (for ``results["figures"]``).

    Returns:
        ``{"cross_source": uri | None, "runs": [{roc, pr, calibration, heatmap, composition,
        audit, embedding, audit_files: [{file, caption, uri | None, problem}]}], "exported":
        [{id, run, kind, caption, svg, png}]}``.
    """
    palette = results.get("palette")
    exported: list[dict[str, Any]] = []

    def draw(figure: Any, name: str, run: str | None, kind: str) -> str | None:
        rendered = fig.render(figure, name, directory)
        if rendered["svg"]:
            exported.append({"id": name, "run": run, "kind": kind, "caption": _CAPTIONS.get(kind, ""),
                             "svg": f"{prefix}{rendered['svg']}", "png": f"{prefix}{rendered['png']}"})
        return rendered["uri"]

    out: dict[str, Any] = {"cross_source": None, "runs": [], "exported": exported}
    binary_runs = [r for r in results["runs"] if r.get("binary") and r.get("evaluation")]
    if len(binary_runs) > 1:
        out["cross_source"] = draw(fig.heatmap_figure(results.get("cross_source")), "cross-source-auc", None, "heatmap")
    for index, run in enumerate(results["runs"], start=1):
        stem = f"{index:02d}-{_slug(run['name'])}"
        seen = (run.get("evaluation") or {}).get("training_sources")
        positive = run.get("positive_class", "positive")
        entry: dict[str, Any] = {key: None for key in ("roc", "pr", "calibration", "heatmap", "audit", "embedding")}
        entry["composition"] = draw(fig.composition_figure(run["composition"], palette, seen), f"{stem}-composition", run["name"], "composition")
        entry["audit_files"] = []
        if run.get("roc"):
            entry["roc"] = draw(fig.roc_figure(run["roc"], palette, positive), f"{stem}-roc", run["name"], "roc")
        if run.get("pr"):
            entry["pr"] = draw(fig.pr_figure(run["pr"], palette, positive), f"{stem}-precision-recall", run["name"], "pr")
        if run.get("calibration"):
            entry["calibration"] = draw(fig.calibration_figure(run["calibration"], palette), f"{stem}-reliability", run["name"], "calibration")
        if run.get("evaluation") and len(binary_runs) == 1:  # one run: its single row of the matrix
            entry["heatmap"] = draw(fig.heatmap_figure(results.get("cross_source")), f"{stem}-auc-by-source", run["name"], "heatmap")
        audit = run["audit"]
        if audit.get("status") == "audited":
            entry["audit"] = draw(fig.audit_figure(audit), f"{stem}-audit", run["name"], "audit")
            points = audit.get("embedding_points")
            entry["embedding"] = draw(fig.embedding_figure(points, palette, seen), f"{stem}-embedding", run["name"], "embedding")
            redrawn = (audit.get("embedding") or {}).get("figure") if entry["embedding"] else None
            audit_dir = Path(run["provenance"]["run_dir"]) / "audit"
            for item in audit.get("figures", []):
                if item["file"] == redrawn:
                    continue  # drawn above from the audit's coordinates, in the report's palette
                figure = {"file": item["file"], "caption": item["caption"], "uri": None, "problem": None}
                if not item["present"]:
                    figure["problem"] = f"{item['file']} is named by audit.json but is not a file in {audit_dir}"
                else:
                    try:
                        figure["uri"] = fig.image_file_data_uri(audit_dir / item["file"])
                    except OSError as exc:  # a broken PNG is reported on the page, not a crash
                        figure["problem"] = f"{item['file']}: not a readable image ({exc})"
                    else:
                        _copy_raster(audit_dir / item["file"], directory, f"{stem}-{Path(item['file']).stem}", prefix, run["name"], exported)
                entry["audit_files"].append(figure)
        out["runs"].append(entry)
    return out


def _copy_raster(source: Path, directory: str | Path | None, name: str, prefix: str, run: str, exported: list[dict[str, Any]]) -> None:
    """An audit raster (the saliency gallery: pixels, not vectors) copied beside the page, PNG only."""
    if directory is None:
        return
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.png") as tmp:
        Path(tmp).write_bytes(source.read_bytes())
    kind = "gallery" if "gallery" in name else "audit-raster"
    exported.append({"id": name, "run": run, "kind": kind, "caption": _CAPTIONS.get(kind, source.name), "svg": None, "png": f"{prefix}{name}.png"})


# ----------------------------------------------------------------------------- page


def render_html(results: Mapping[str, Any], figures: Mapping[str, Any]) -> str:
    """The page's HTML from the collected numbers and the figures' data URIs."""
    from covidcxr.evaluate.metrics import CI_DESCRIPTION

    template = _environment().get_template(TEMPLATE)
    return template.render(results=results, figures=figures, ci_description=CI_DESCRIPTION)


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    json_path: str | Path | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reevaluate: bool = False,
    title: str | None = None,
    ground_truth: Mapping[str, Any] | None = None,
    figures: bool = True,
) -> ReportPaths:
    """Write the report page, its ``results.json`` and its figures (all atomically).

    Args:
        run_dirs: one or more run directories.
        out: the HTML file to write.
        json_path: where ``results.json`` goes (default: beside ``out``).
        threshold, n_boot, seed, reevaluate: see :func:`covidcxr.report.results.load_run_inputs`.
        title: the page title.
        ground_truth: a planted shortcut the page states and checks (see
            :func:`covidcxr.report.results.ground_truth_outcome`).
        figures: also write every figure as SVG and 300-dpi PNG into ``<out stem>_figures/``
            beside the page (listed in ``results.json`` under ``figures``).

    Returns:
        A :class:`ReportPaths`.

    Raises:
        CovidCXRError: a run that cannot be read, or ``out`` not ending in .html/.htm.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise CovidCXRError(f"--out {out}: expected an .html file")
    if out.is_dir():
        raise CovidCXRError(f"--out {out}: is a directory (expected a file name ending in .html)")
    target_json = Path(json_path) if json_path is not None else out.with_name("results.json")
    if target_json.resolve() == out.resolve():
        raise CovidCXRError(f"--json {target_json}: the same file as --out")
    results = collect_results(run_dirs, threshold=threshold, n_boot=n_boot, seed=seed, reevaluate=reevaluate, title=title, ground_truth=ground_truth)
    folder = out.with_name(f"{out.stem}_figures")
    drawn = build_figures(results, folder if figures else None, prefix=f"{folder.name}/")
    results["figures"] = drawn["exported"]
    html = render_html(results, drawn)
    write_results_json(results, target_json)
    atomic_write_text(out, html)
    return ReportPaths(html=out, json=target_json, results=results, html_bytes=len(html.encode("utf-8")), figures=folder if figures else None)
