"""The report: one self-contained HTML page and a ``results.json`` over one or more runs.

The last stage of the data's journey (see DESIGN.md): it reads what training, evaluation
and the audit wrote into run directories and shows it to a person — the audit's findings
first, then metrics with patient-bootstrap CIs per test source (seen vs unseen), the
operating point, ROC and precision–recall curves, calibration, the train × test AUC
matrix, the data composition and the run's configuration. ``results.json`` holds every
number the page shows; every figure is also written as SVG and 300-dpi PNG beside it.

* :mod:`covidcxr.report.results` — collect every number (JSON-ready dict);
* :mod:`covidcxr.report.figures` — matplotlib figures, embedded PNG and exported files;
* :mod:`covidcxr.report.palette` — the one colour-blind-safe palette of every figure;
* :mod:`covidcxr.report.html` — the Jinja2 page, :func:`write_report`.

Example::

    >>> from covidcxr.report import write_report
    >>> write_report(["runs/small_shared"], "report.html").html         # doctest: +SKIP
    PosixPath('report.html')
"""

from covidcxr.report.html import ReportPaths, render_html, write_report
from covidcxr.report.results import collect_results, write_results_json

__all__ = ["ReportPaths", "collect_results", "render_html", "write_report", "write_results_json"]
