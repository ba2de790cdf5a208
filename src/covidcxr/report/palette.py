"""One colour-blind-safe palette for every figure covidcxr draws (report and audit).

Same thing, same colour, on every figure of a report: a label (``covid``, ``pneumonia``,
``normal``, ``other``) always has the colour of :data:`LABEL_COLORS`; a source has the
colour :func:`source_colors` gives it from the sorted list of *all* the sources a report
shows (so adding a figure never recolours a source); pooled / seen / unseen groups have
the colours of :data:`ROLE_COLORS`.

* Labels and roles use the Okabe–Ito palette (Okabe & Ito 2008, "Color Universal Design";
  recommended by Wong 2011, Nature Methods 8:441), distinguishable with protanopia,
  deuteranopia and tritanopia.
* Sources use Paul Tol's "muted" qualitative scheme (Tol 2021, "Colour Schemes", SRON
  technical note SRON/EPS/TN/09-002, §2), nine colour-blind-safe colours that stay
  distinct from one another on a white background. Past nine sources the colours repeat and
  :func:`source_markers` (a distinct marker per source) keeps scatter plots readable.

Example::

    >>> from covidcxr.report.palette import LABEL_COLORS, source_colors
    >>> source_colors(["site_b", "site_a"])
    {'site_a': '#332288', 'site_b': '#44AA99'}
    >>> LABEL_COLORS["covid"]
    '#D55E00'
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "LABEL_COLORS",
    "OKABE_ITO",
    "ROLE_COLORS",
    "TOL_MUTED",
    "VARIANT_COLORS",
    "label_color",
    "label_colors",
    "source_colors",
    "source_markers",
]

#: Okabe & Ito (2008): name -> hex
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
#: Tol (2021) "muted", ordered so the first sources get the darker colours (readable as thin
#: lines on white; the pale cyan and sand come last); the pale grey (#DDDDDD) marks "no data"
TOL_MUTED = ("#332288", "#44AA99", "#CC6677", "#117733", "#882255", "#999933", "#AA4499", "#88CCEE", "#DDCC77")
NO_DATA = "#DDDDDD"

#: diagnostic labels: COVID-19 vermillion, pneumonia orange, normal bluish green, other grey-black
LABEL_COLORS = {
    "covid": OKABE_ITO["vermillion"],
    "pneumonia": OKABE_ITO["orange"],
    "normal": OKABE_ITO["bluish_green"],
    "other": "#6B6B6B",
}
_EXTRA_LABELS = (OKABE_ITO["reddish_purple"], OKABE_ITO["sky_blue"], OKABE_ITO["yellow"])

#: groups of test images: all pooled, the sources the model trained on, those it never saw
ROLE_COLORS = {"pooled": OKABE_ITO["black"], "seen": OKABE_ITO["blue"], "unseen": OKABE_ITO["reddish_purple"]}
#: the audit's image variants (whole image, lungs blanked, lungs only)
VARIANT_COLORS = {"whole image": "#6B6B6B", "lungs blanked": OKABE_ITO["vermillion"], "lungs only": OKABE_ITO["bluish_green"]}

_MARKERS = "osD^v<>pXhP*"


def label_color(label: str) -> str:
    """The colour of one diagnostic label (unknown labels: see :func:`label_colors`)."""
    return label_colors([label])[str(label)]


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """Colours of labels: the fixed :data:`LABEL_COLORS`, then unknown labels in sorted order.

    Args:
        labels: label names (any order; duplicates allowed).

    Returns:
        ``{label: hex}``.
    """
    names = sorted({str(v) for v in labels})
    unknown = [n for n in names if n not in LABEL_COLORS]
    out = {n: LABEL_COLORS[n] for n in names if n in LABEL_COLORS}
    out.update({n: _EXTRA_LABELS[k % len(_EXTRA_LABELS)] for k, n in enumerate(unknown)})
    return out


def source_colors(sources: Iterable[str]) -> dict[str, str]:
    """Colours of sources, assigned in sorted order from *every* source a report shows.

    Pass the full list (all runs, seen and unseen, every figure's sources) once and use the
    mapping everywhere: a source then has one colour on every figure.

    Args:
        sources: source names (duplicates allowed).

    Returns:
        ``{source: hex}`` with Tol's muted colours in order (repeating past nine).

    Example::

        >>> source_colors(["b", "a", "a"])
        {'a': '#332288', 'b': '#44AA99'}
    """
    names = sorted({str(s) for s in sources})
    return {name: TOL_MUTED[k % len(TOL_MUTED)] for k, name in enumerate(names)}


def source_markers(sources: Iterable[str]) -> dict[str, str]:
    """A matplotlib marker per source, in the order of :func:`source_colors`.

    Example::

        >>> source_markers(["b", "a"])
        {'a': 'o', 'b': 's'}
    """
    names = sorted({str(s) for s in sources})
    return {name: _MARKERS[k % len(_MARKERS)] for k, name in enumerate(names)}
