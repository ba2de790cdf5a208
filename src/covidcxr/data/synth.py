"""Synthetic chest X-ray phantoms: the embedded default data for ``make demo`` and fast tests.

A phantom is a frontal (PA/AP) chest radiograph drawn analytically, with an *exact* lung
mask, a label whose signal lies only inside the lungs, a site whose signal lies only in
the acquisition, and, on request, a planted shortcut correlated with the label that lies
only outside the lungs (or in the global intensity window). Everything downstream — the
lung U-Net, preprocessing, the classifier and the shortcut audit — can therefore be run
end to end and checked against a known truth, with no patient data and no download.

Anatomy (`sample_anatomy`, drawn once per patient, in *anatomical* coordinates where the
frame spans ``[-1, 1]`` at a field of view of 1; image left is the patient's right):

* air around the patient (dark), a soft-tissue torso with shoulders, neck and upper arms
  (brighter in the middle, where the body is thicker), the liver/spleen below the domes;
* two lungs, each a teardrop bounded by a rounded apex, a lateral chest wall and a
  diaphragm dome with a sharp lateral costophrenic angle; the right lung (image left) is
  wider and its dome higher, as in real chests; size, position and shape are randomised;
* the mediastinum, aortic knob and heart (bright), the heart shifted to the patient's
  left and overlapping the lower medial left lung; the lung mask *excludes* them, as the
  Shenzhen and Montgomery masks do (Jaeger et al. 2014, Quant Imaging Med Surg 4:475);
* bone: the spine with vertebral segmentation, posterior rib arcs (bright curved bands
  across the lungs), fainter anterior ribs, clavicles and humeral heads; the trachea (dark);
* lung markings: vessels fanning out from the hila, fading towards the periphery.

Findings (`sample_finding`), added strictly inside the lung mask before acquisition, with a
random severity so the task is not trivial (peak opacity 0.05–0.2 in intensity units, where
lungs sit near 0.2–0.3 and the mediastinum near 0.65):

* ``covid``: bilateral patchy ground-glass opacities, peripheral and lower-zone, the
  commonest radiographic pattern of COVID-19 (Wong et al. 2020, Radiology 296:E72);
* ``pneumonia``: one denser lobar consolidation, usually unilateral, mid/lower zone, with
  a well-defined margin (sometimes the minor fissure) and air bronchograms;
* ``other``: an upper-zone nodular pattern, sometimes with a cavity (TB-like);
* ``normal``: none.

Sites (`SiteProfile`, `DEFAULT_SITES`) differ only in acquisition — contrast, gamma,
brightness, noise, blur, field of view, positioning jitter, a heel-effect gradient, the
share of portable AP films — and in class balance (``label_mix``). That reproduces the
setting of the public COVID CXR collections, where every class came from a different
hospital and a classifier can score well by recognising the hospital.

Shortcut (`ShortcutSpec`, off by default): with probability ``strength`` an image of the
chosen label (at the chosen site, or at all sites) carries either a bright burned-in text
``marker`` in a corner, away from the lungs and the body, a shifted global intensity
``window``, or the AP ``view`` (the projection confounded with the label, no pixel added);
other labels carry it with probability ``false_rate``. Tartaglione et al.
(2020, "Unveiling COVID-19 from chest X-ray with deep learning: a hurdles race with small
data", IJERPH 17:6933, §3.2) show that such text markers and windowing differences
between sources are enough for a network to separate the classes without looking at the
lungs, and DeGrave et al. (2021, Nat Mach Intell 3:610, "AI for radiographic COVID-19
detection selects shortcuts over signal") found real COVID detectors relying on exactly
these laterality/text markers and image-border cues. The planted shortcut lets the audit
stages prove that they detect such a model: the shortcut flag is recorded per image, and
an image rendered with and without it is identical in the lungs.

Determinism: image ``i`` is drawn from ``np.random.default_rng([seed, i])``, a patient's
anatomy from its own seed, and the plan (which patient, label, view, shortcut) from a
per-site seed, so a run is byte-identical for a seed, a partial run resumes by skipping
finished files, and switching the shortcut on changes nothing but the images carrying it.

Example:
    >>> import numpy as np
    >>> image, mask = render_phantom(np.random.default_rng(0), 128, "covid", DEFAULT_SITES[0])
    >>> image.shape, image.dtype, mask.dtype
    ((128, 128), dtype('float32'), dtype('bool'))
    >>> table = synthesize("/tmp/phantoms", n_images=12, size=128)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
from scipy import ndimage

from covidcxr.data.manifest import LABELS, file_sha1, make_manifest, write_manifest
from covidcxr.io.atomic import atomic_write_text
from covidcxr.io.writers import write_png

__all__ = [
    "DEFAULT_SITES",
    "SHORTCUT_KINDS",
    "SYNTH_VERSION",
    "Anatomy",
    "Finding",
    "Lung",
    "Phantom",
    "ShortcutSpec",
    "SiteProfile",
    "plan_synthesis",
    "render_phantom",
    "render_phantom_detailed",
    "sample_anatomy",
    "sample_finding",
    "synthesize",
]

# Bump when a change alters the pixels for a given seed, so stale folders are not resumed.
SYNTH_VERSION = 1

# Seed-sequence tags. NumPy's SeedSequence ignores trailing zeros ([s, 0] == [s]), so
# plan/patient seeds carry a large tag that no image index ([seed, index]) can reach.
_TAG_PLAN = 0x5EED_0001
_TAG_PATIENT = 0x5EED_0002
_TAG_LAYOUT = 0x5EED_0003


# --------------------------------------------------------------------------------------
# Sites and shortcuts
# --------------------------------------------------------------------------------------


def _frozen_mapping(mapping: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital acquires and displays its radiographs, and which patients it sees.

    The site signal lives only here — in the acquisition and the class balance — never in
    the anatomy or the findings.

    Attributes:
        name: the site's name; becomes the manifest's ``source`` and patient-id prefix.
        contrast: contrast multiplier about mid-grey applied to the raw radiograph.
        brightness: offset added after the contrast stretch (intensity units).
        noise_sigma: standard deviation of the additive detector noise (intensity units).
        blur_sigma: Gaussian blur (detector/focal-spot unsharpness), in pixels at 256 px;
            scaled with the image size so a site looks the same at every size.
        field_of_view: how much of the frame the body fills (1.0 fills it; 0.8 leaves a
            wider border of air), the zoom of the acquisition.
        offset_jitter: patient-positioning jitter, in pixels at 256 px (scaled with size).
        label_mix: probability of each label among the site's patients (sums to 1).
        gamma: display gamma applied after contrast/brightness (1 = linear).
        heel_effect: strength of a top-to-bottom exposure gradient (anode heel effect).
        ap_rate: share of portable AP films (the rest are PA); AP films magnify the heart.
        description: one line for the generated README.
    """

    name: str
    contrast: float = 1.0
    brightness: float = 0.0
    noise_sigma: float = 0.02
    blur_sigma: float = 1.0
    field_of_view: float = 0.9
    offset_jitter: float = 4.0
    label_mix: Mapping[str, float] = field(
        default_factory=lambda: _frozen_mapping({"normal": 0.4, "pneumonia": 0.25, "covid": 0.25, "other": 0.1})
    )
    gamma: float = 1.0
    heel_effect: float = 0.0
    ap_rate: float = 0.2
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or "/" in self.name:
            raise ValueError(f"site name {self.name!r} must be non-empty, without ':' or '/'")
        unknown = set(self.label_mix) - set(LABELS)
        if unknown:
            raise ValueError(f"site {self.name!r}: label_mix has unknown labels {sorted(unknown)}; expected {LABELS}")
        if any(p < 0 for p in self.label_mix.values()) or not math.isclose(sum(self.label_mix.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"site {self.name!r}: label_mix must be non-negative and sum to 1, got {dict(self.label_mix)}")
        if not 0.3 <= self.field_of_view <= 1.2:
            raise ValueError(f"site {self.name!r}: field_of_view {self.field_of_view} outside 0.3-1.2")
        if self.contrast <= 0 or self.gamma <= 0 or self.noise_sigma < 0 or self.blur_sigma < 0 or self.offset_jitter < 0:
            raise ValueError(f"site {self.name!r}: contrast/gamma must be > 0 and noise/blur/jitter >= 0")
        if not 0.0 <= self.ap_rate <= 1.0:
            raise ValueError(f"site {self.name!r}: ap_rate {self.ap_rate} outside 0-1")
        # Freeze the mapping so a frozen profile really is immutable (and hashable by id).
        object.__setattr__(self, "label_mix", _frozen_mapping(self.label_mix))

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (``label_mix`` in `LABELS` order)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["label_mix"] = {label: float(self.label_mix.get(label, 0.0)) for label in LABELS}
        return out


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site_a",
        contrast=1.15,
        brightness=0.0,
        noise_sigma=0.010,
        blur_sigma=0.6,
        field_of_view=0.97,
        offset_jitter=6.0,
        label_mix={"normal": 0.45, "pneumonia": 0.25, "covid": 0.20, "other": 0.10},
        gamma=1.0,
        heel_effect=0.0,
        ap_rate=0.10,
        description="university hospital, digital PA radiography: sharp, low noise, tight framing",
    ),
    SiteProfile(
        name="site_b",
        contrast=0.90,
        brightness=-0.04,
        noise_sigma=0.028,
        blur_sigma=1.2,
        field_of_view=0.91,
        offset_jitter=9.0,
        label_mix={"normal": 0.30, "pneumonia": 0.35, "covid": 0.20, "other": 0.15},
        gamma=1.35,
        heel_effect=0.10,
        ap_rate=0.30,
        description="community hospital, computed radiography: darker gamma, heel effect, moderate noise",
    ),
    SiteProfile(
        name="site_c",
        contrast=0.75,
        brightness=0.05,
        noise_sigma=0.050,
        blur_sigma=1.8,
        field_of_view=0.87,
        offset_jitter=12.0,
        label_mix={"normal": 0.25, "pneumonia": 0.15, "covid": 0.55, "other": 0.05},
        gamma=0.85,
        heel_effect=-0.06,
        ap_rate=0.85,
        description="COVID ward, portable AP films: washed out, blurred, noisy, loose framing",
    ),
)


#: the planted shortcut types (`ShortcutSpec.kind`)
SHORTCUT_KINDS = ("marker", "window", "view")


@dataclass(frozen=True)
class ShortcutSpec:
    """A shortcut planted outside the lungs, correlated with one label.

    Attributes:
        kind: ``"marker"`` (a bright burned-in text block in a corner, outside lungs and
            body), ``"window"`` (a brighter, lower-contrast global intensity window) or
            ``"view"`` (the projection follows the label: a carrying image is an AP film —
            magnified heart, higher clavicles, shallower inspiration, more rotation — and
            the site's other images are PA; no marker, no intensity change).
        site: the site where it is planted, or None for every site.
        label: the label it correlates with.
        strength: probability that an image of ``label`` (at ``site``) carries it.
        false_rate: probability that an image of another label (at ``site``) carries it.
        text: the marker's text (letters from ``ABCDEILOPRSTUX12`` and space).
        corner: ``"top_right"`` or ``"top_left"``: where the marker is burned in.

    Example:
        >>> ShortcutSpec("marker", site="site_c").probability("covid", "site_c")
        0.9
    """

    kind: str = "marker"
    site: str | None = None
    label: str = "covid"
    strength: float = 0.9
    false_rate: float = 0.05
    text: str = "ICU"
    corner: str = "top_right"

    def __post_init__(self) -> None:
        if self.kind not in SHORTCUT_KINDS:
            raise ValueError(f"shortcut kind {self.kind!r}; expected one of {SHORTCUT_KINDS}")
        if self.label not in LABELS:
            raise ValueError(f"shortcut label {self.label!r}; expected one of {LABELS}")
        if not (0.0 <= self.strength <= 1.0 and 0.0 <= self.false_rate <= 1.0):
            raise ValueError("shortcut strength and false_rate must lie in 0-1")
        if self.corner not in ("top_right", "top_left"):
            raise ValueError(f"shortcut corner {self.corner!r}; expected 'top_right' or 'top_left'")
        bad = sorted(set(self.text.upper()) - set(_GLYPHS))
        if not self.text.strip() or bad:
            raise ValueError(f"marker text {self.text!r} uses unsupported characters {bad}; use {''.join(sorted(_GLYPHS))}")

    def probability(self, label: str, site: str) -> float:
        """Probability that an image with ``label`` at ``site`` carries the shortcut."""
        if self.site is not None and site != self.site:
            return 0.0
        return self.strength if label == self.label else self.false_rate

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


# 5x7 bitmap glyphs: burned-in scanner text is blocky, and a numpy font needs no font file
# and gives the same bytes under every Pillow version.
_GLYPH_ROWS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "I": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "#####"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    " ": (".....",) * 7,
}
_GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPH_ROWS.items()}


def _text_bitmap(text: str, scale: int) -> np.ndarray:
    """Render ``text`` with the 5x7 font, one blank column between glyphs, scaled by ``scale``."""
    columns: list[np.ndarray] = []
    for i, ch in enumerate(text.upper()):
        if i:
            columns.append(np.zeros((7, 1), dtype=bool))
        columns.append(_GLYPHS[ch])
    bitmap = np.hstack(columns)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))


# --------------------------------------------------------------------------------------
# Anatomy and findings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lung:
    """One lung in anatomical coordinates (frame ``[-1, 1]``, y down).

    Attributes:
        side: -1 for image left (the patient's right lung), +1 for image right.
        medial: distance from the midline of the medial edge.
        lateral: distance from the midline of the lateral chest wall.
        top: y of the apex.
        base: y of the lateral costophrenic angle (the lowest point).
        dome: height of the diaphragm dome, as a fraction of the lung height.
        apex_u: where the apex sits across the lung, 0 medial .. 1 lateral.
        wall: fraction of the height over which the lung reaches its full width.
    """

    side: int
    medial: float
    lateral: float
    top: float
    base: float
    dome: float
    apex_u: float
    wall: float


@dataclass(frozen=True)
class Anatomy:
    """A patient's body, drawn once per patient so follow-up films show the same chest.

    All lengths are in anatomical coordinates (the frame spans ``[-1, 1]`` at a field of
    view of 1). See `sample_anatomy`.
    """

    sex: str
    habitus: float
    body_half_width: float
    soft_tissue: float
    lung_darkness: float
    lungs: tuple[Lung, Lung]
    heart: tuple[float, float, float, float, float]  # cx, cy, a, b, angle (radians)
    mediastinum_width: float
    knob: tuple[float, float, float]  # cx, cy, radius of the aortic knob
    rib_start: float
    rib_spacing: float
    rib_curve: float
    clavicle_y: float
    texture_seed: int
    layout_seed: int


def sample_anatomy(rng: np.random.Generator, sex: str | None = None) -> Anatomy:
    """Draw one patient's anatomy.

    Args:
        rng: the generator to draw from (a fixed number of draws).
        sex: ``"M"`` or ``"F"``; drawn 50/50 when None. Women are a little smaller.

    Returns:
        An `Anatomy`.
    """
    u = rng.random(24)
    if sex is None:
        sex = "F" if u[0] < 0.5 else "M"
    female = sex == "F"
    habitus = (0.88 if female else 0.93) + 0.16 * u[1]

    def between(lo: float, hi: float, k: int) -> float:
        return float(lo + (hi - lo) * u[k])

    # The right lung (image left) is wider, its dome higher (the liver pushes it up).
    top = between(-0.80, -0.70, 2)
    right = Lung(
        side=-1,
        medial=between(0.03, 0.06, 3),
        lateral=between(0.80, 0.87, 4),
        top=top + between(-0.02, 0.02, 5),
        base=between(0.42, 0.50, 6),
        dome=between(0.16, 0.26, 7),
        apex_u=between(0.30, 0.42, 8),
        wall=between(0.45, 0.65, 9),
    )
    left = Lung(
        side=1,
        medial=between(0.04, 0.07, 10),
        lateral=right.lateral - between(0.02, 0.07, 11),
        top=top + between(0.0, 0.04, 12),
        base=right.base + between(0.02, 0.08, 13),
        dome=between(0.14, 0.22, 14),
        apex_u=between(0.28, 0.40, 15),
        wall=between(0.45, 0.65, 16),
    )
    heart = (
        between(0.08, 0.14, 17),  # shifted to the patient's left (image right)
        between(0.12, 0.19, 18),
        between(0.30, 0.36, 19),
        between(0.24, 0.28, 20),
        between(-0.40, -0.20, 21),  # long axis tilted: the apex points down and left
    )
    seeds = rng.integers(0, 2**31 - 1, size=2)
    return Anatomy(
        sex=sex,
        habitus=float(habitus),
        body_half_width=between(0.90, 0.98, 22),
        soft_tissue=between(0.30, 0.36, 23),
        lung_darkness=float(0.50 + 0.10 * rng.random()),
        lungs=(right, left),
        heart=heart,
        mediastinum_width=float(0.085 + 0.03 * rng.random()),
        knob=(float(0.10 + 0.03 * rng.random()), float(-0.33 + 0.05 * rng.random()), float(0.055 + 0.02 * rng.random())),
        rib_start=float(-0.90 + 0.04 * rng.random()),
        rib_spacing=float(0.105 + 0.015 * rng.random()),
        rib_curve=float(0.55 + 0.15 * rng.random()),
        clavicle_y=float(-0.62 + 0.05 * rng.random()),
        texture_seed=int(seeds[0]),
        layout_seed=int(seeds[1]),
    )


@dataclass(frozen=True)
class Finding:
    """The radiographic finding of one image, in lung-local coordinates.

    ``u`` runs 0 (medial) → 1 (lateral) across a lung, ``v`` 0 (apex) → 1 (base) down it,
    so a blob keeps its zone whatever the lung's size.

    Attributes:
        label: the image's label.
        blobs: ``(side, u, v, su, sv, weight)`` Gaussian components.
        severity: peak opacity added inside the lung (intensity units), 0 for normal.
        description: the manifest's ``finding`` text.
        fissure: ``(side, v)`` of a sharp upper margin (the minor fissure), or None.
        cavity: ``(side, u, v, radius_u, radius_v)`` of a cavity, or None.
        texture_seed: seed of the patchiness texture.
    """

    label: str
    blobs: tuple[tuple[int, float, float, float, float, float], ...]
    severity: float
    description: str
    fissure: tuple[int, float] | None = None
    cavity: tuple[int, float, float, float, float] | None = None
    texture_seed: int = 0


_SEVERITY = {"covid": (0.06, 0.16), "pneumonia": (0.09, 0.20), "other": (0.08, 0.18), "normal": (0.0, 0.0)}
_DESCRIPTIONS = {
    "covid": "synthetic: bilateral peripheral lower-zone ground-glass opacities",
    "normal": "synthetic: no finding",
    "other": "synthetic: upper-zone nodular pattern (TB-like)",
}


def _finding_layout(layout_rng: np.random.Generator, label: str) -> Finding:
    """The patient's finding layout (where the lesions are); severity is set per image."""
    r = layout_rng
    seed = int(r.integers(0, 2**31 - 1))
    if label == "normal":
        return Finding(label, (), 0.0, _DESCRIPTIONS["normal"], texture_seed=seed)
    if label == "covid":
        blobs = []
        for side in (-1, 1):  # bilateral
            for _ in range(int(r.integers(2, 6))):
                blobs.append(
                    (side, r.uniform(0.60, 1.0), r.uniform(0.50, 0.95), r.uniform(0.10, 0.20), r.uniform(0.07, 0.13), r.uniform(0.6, 1.0))
                )
        return Finding(label, tuple(blobs), 0.0, _DESCRIPTIONS["covid"], texture_seed=seed)
    if label == "pneumonia":
        side = -1 if r.random() < 0.6 else 1  # right lower lobe pneumonia is the commonest
        u0, v0 = r.uniform(0.30, 0.75), r.uniform(0.45, 0.85)
        su, sv = r.uniform(0.16, 0.26), r.uniform(0.10, 0.18)
        blobs = [(side, u0, v0, su, sv, 1.0)]
        for _ in range(int(r.integers(1, 3))):
            blobs.append((side, u0 + r.normal(0, 0.10), v0 + r.normal(0, 0.07), su * r.uniform(0.5, 0.8), sv * r.uniform(0.5, 0.8), r.uniform(0.6, 1.0)))
        fissure = (side, v0 - sv * r.uniform(0.6, 1.0)) if (side == -1 and r.random() < 0.5) else None
        zone = "lower" if v0 > 0.62 else "mid"
        text = f"synthetic: lobar consolidation, {'right' if side == -1 else 'left'} {zone} zone"
        return Finding(label, tuple(blobs), 0.0, text, fissure=fissure, texture_seed=seed)
    if label == "other":
        sides = [-1 if r.random() < 0.5 else 1]
        if r.random() < 0.3:
            sides = [-1, 1]
        blobs = []
        cavity = None
        for side in sides:
            uc, vc = r.uniform(0.25, 0.75), r.uniform(0.10, 0.35)
            blobs.append((side, uc, vc, r.uniform(0.12, 0.18), r.uniform(0.07, 0.11), 0.35))  # fibrotic haze
            for _ in range(int(r.integers(4, 10))):
                su = r.uniform(0.03, 0.055)
                blobs.append((side, uc + r.normal(0, 0.09), vc + r.normal(0, 0.06), su, su * 0.65, r.uniform(0.6, 1.0)))
            if cavity is None and r.random() < 0.5:
                cavity = (side, uc, vc, r.uniform(0.07, 0.10), r.uniform(0.045, 0.06))
        return Finding(label, tuple(blobs), 0.0, _DESCRIPTIONS["other"], cavity=cavity, texture_seed=seed)
    raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")


def sample_finding(rng: np.random.Generator, label: str, anatomy: Anatomy, severity: float | None = None) -> Finding:
    """Draw the finding of one image of a patient.

    The layout (where the lesions are) comes from the patient (``anatomy.layout_seed``), so
    follow-up films show the same lesions; this image's severity and small shifts of each
    lesion come from ``rng`` — a follow-up has progressed or resolved a little.

    Args:
        rng: the image's finding generator.
        label: one of `LABELS`.
        anatomy: the patient.
        severity: peak opacity; drawn from the label's range when None.

    Returns:
        A `Finding` (empty for ``normal``).
    """
    layout = _finding_layout(np.random.default_rng([anatomy.layout_seed, _TAG_LAYOUT, LABELS.index(label)]), label)
    lo, hi = _SEVERITY[label]
    drawn = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    jitter = rng.normal(0.0, 0.025, size=(max(len(layout.blobs), 1), 2))
    weights = rng.uniform(0.8, 1.2, size=max(len(layout.blobs), 1))
    blobs = tuple(
        (side, u + jitter[i, 0], v + jitter[i, 1], su, sv, w * weights[i])
        for i, (side, u, v, su, sv, w) in enumerate(layout.blobs)
    )
    return dataclasses.replace(layout, blobs=blobs, severity=drawn if severity is None else float(severity))


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom and what went into it.

    Attributes:
        image: ``(H, W)`` float32 in [0, 1], the displayed radiograph.
        mask: ``(H, W)`` bool, the exact lung mask (heart and mediastinum excluded).
        finding_map: ``(H, W)`` float32, the opacity added inside the lungs before
            acquisition (zero outside the mask).
        marker_mask: ``(H, W)`` bool, the pixels of a burned-in marker (all False if none).
        finding: the finding's description.
        severity: the finding's peak opacity (0 for normal).
        view: ``"PA"`` or ``"AP"``.
        shortcut: whether a shortcut was applied.
    """

    image: np.ndarray
    mask: np.ndarray
    finding_map: np.ndarray
    marker_mask: np.ndarray
    finding: str
    severity: float
    view: str
    shortcut: bool


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], y down; cached because every render needs them."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return xs, ys


def _g(t: np.ndarray) -> np.ndarray:
    """Quarter-circle ramp 0→1 over t in [0, 1]: infinite slope at 0 gives a rounded apex."""
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - t) ** 2)


def _band(dist: np.ndarray, half: float, edge: float) -> np.ndarray:
    """Smooth top-hat: 1 within ``half`` of a centre line, falling to 0 over ``edge``."""
    return np.clip((half - np.abs(dist)) / edge + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float], wrap: bool = False) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap" if wrap else "reflect")
    field_ /= field_.std() + 1e-8
    return field_.astype(np.float32)


def _sample(table: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str = "nearest") -> np.ndarray:
    return ndimage.map_coordinates(table, [rows.ravel(), cols.ravel()], order=1, mode=mode).reshape(rows.shape)


def _largest_per_side(mask: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Keep the largest connected piece of each lung and fill holes.

    At small sizes a thin costophrenic tip can alias into a separate island; dropping it
    (before the image is drawn from the mask) keeps the mask exactly two components.
    """
    out = np.zeros_like(mask)
    for side_mask in (mask & (xs < 0), mask & (xs >= 0)):
        labels, n = ndimage.label(side_mask)
        if n == 0:
            continue
        if n > 1:
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            side_mask = labels == int(np.argmax(counts))
        out |= ndimage.binary_fill_holes(side_mask)
    return out


def _habitus_field(xa: np.ndarray, ya: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """A patient's own smooth soft-tissue pattern (fat, muscle, breast and arm shadows).

    Real radiographs of different people differ in many such broad shadows; without them
    phantoms of different patients share one template and look like near-duplicates to
    the perceptual hash (`covidcxr.data.dedup`). Drawn from its own stream of the
    patient's seed, in anatomical coordinates, so a follow-up film keeps it.
    """
    rng = np.random.default_rng([anatomy.texture_seed, 0x4AB1])
    field = np.zeros_like(xa)
    for cx, cy, sigma, amplitude in zip(
        rng.uniform(-1.0, 1.0, 10), rng.uniform(-0.9, 1.0, 10), rng.uniform(0.12, 0.35, 10), rng.uniform(-0.14, 0.14, 10)
    ):
        field += np.float32(amplitude) * np.exp(-((xa - cx) ** 2 + (ya - cy) ** 2) / np.float32(2.0 * sigma**2))
    return field


def _draw_chest(
    xa: np.ndarray,
    ya: np.ndarray,
    anatomy: Anatomy,
    finding: Finding,
    view: str,
    inspiration: float,
    pixel: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw radiograph (before acquisition), the lung mask and the finding map.

    Every structure is an analytic function of the anatomical coordinates ``(xa, ya)`` of
    each pixel, so zoom, shift and rotation cost nothing extra and the mask is exact: it is
    the same inside-test that darkens the image, evaluated on the same grid.
    """
    f32 = np.float32
    ax = np.abs(xa)
    right_side = xa < 0
    bw = anatomy.body_half_width

    # --- body: everything below the neck/shoulder line and inside the lateral soft tissue
    # (chest wall and arms), thicker — so brighter — in the middle.
    shoulder = np.where(ax < 0.16, f32(-3.0), -1.0 + 0.36 * np.clip((ax - 0.16) / 0.85, 0.0, None) ** 1.3)
    edge = bw + 0.10 - 0.16 * np.clip((-ya - 0.1) / 0.7, 0.0, 1.0) ** 1.5
    body = (ya > shoulder) & (ax < edge)
    thickness = np.sqrt(np.clip(1.0 - (xa / (bw + 0.1)) ** 2, 0.0, 1.0))
    img = np.where(body, anatomy.soft_tissue + 0.16 * thickness + _habitus_field(xa, ya, anatomy), 0.03).astype(f32)

    # --- lungs, in lung-local coordinates (u across, v down), each pixel on its own side.
    lung_r, lung_l = anatomy.lungs
    pick = lambda a, b: np.where(right_side, f32(a), f32(b))  # noqa: E731
    medial, lateral = pick(lung_r.medial, lung_l.medial), pick(lung_r.lateral, lung_l.lateral)
    top = pick(lung_r.top, lung_l.top)
    base = top + (pick(lung_r.base, lung_l.base) - top) * f32(inspiration)
    u = (ax - medial) / (lateral - medial)
    v = (ya - top) / (base - top)
    apex_u, wall, dome = pick(lung_r.apex_u, lung_l.apex_u), pick(lung_r.wall, lung_l.wall), pick(lung_r.dome, lung_l.dome)
    # A dome-shaped apex: half-width grows like v**0.75 near the top (a circle would be v**0.5).
    lateral_edge = apex_u + (1.0 - apex_u) * _g(v / wall) ** 1.5
    medial_edge = apex_u * (1.0 - _g(v / 0.30) ** 1.5)
    diaphragm = np.minimum(1.0 - dome * (1.0 - ((u - 0.42) / 0.62) ** 2), 1.0)
    lung_shape = (v >= 0) & (u >= medial_edge) & (u <= lateral_edge) & (v <= diaphragm)

    # --- mediastinum, aortic knob and heart: bright, and cut out of the lung mask.
    hx, hy, ha, hb, hang = anatomy.heart
    if view == "AP":  # the heart is far from the detector on AP films: magnified
        ha, hb = ha * 1.12, hb * 1.08
    c, s = math.cos(hang), math.sin(hang)
    dx, dy = xa - hx, ya - hy
    heart = ((c * dx + s * dy) / ha) ** 2 + ((-s * dx + c * dy) / hb) ** 2 <= 1.0
    # The heart sits on the diaphragm: below its centre it reaches down to the domes, so
    # no sliver of lung is left under it (as in the Shenzhen/Montgomery masks).
    heart |= (dy > 0) & (np.abs(dx) < 0.92 * ha) & (v <= diaphragm + 0.05)
    mw = anatomy.mediastinum_width
    upper_med = (np.abs(xa - 0.01) < mw + 0.08 * np.clip((ya + 0.55) / 0.55, 0.0, 1.0) ** 1.5) & (ya < hy)
    kx, ky, kr = anatomy.knob
    knob = (xa - kx) ** 2 + (ya - ky) ** 2 <= kr**2
    central = (heart | upper_med | knob) & body
    mask = _largest_per_side(lung_shape & ~central & body, xa)
    lung = mask.astype(f32)

    # Below the domes: liver (right) and spleen (left) are denser than lung; the stomach
    # bubble under the left dome is dark.
    below = (v > diaphragm) & (v > 0.3) & body
    lateral_fade = np.clip((lateral + 0.12 - ax) / 0.12, 0.0, 1.0)
    img += (0.08 * np.clip((v - diaphragm) / 0.04, 0.0, 1.0) * lateral_fade * below).astype(f32)
    bubble = (((xa - (lung_l.medial + 0.45 * (lung_l.lateral - lung_l.medial))) / 0.10) ** 2 + ((v - 1.08) / 0.07) ** 2 <= 1.0) & ~right_side & below
    img -= np.where(bubble, f32(0.07), f32(0.0))

    # Lungs are air: darker, less so at the apices (shoulder girdle) and bases (soft tissue),
    # and less so in women's lower zones (breast shadows).
    darken = anatomy.lung_darkness * (1.0 - 0.25 * np.clip(1.0 - v / 0.25, 0.0, 1.0) - 0.15 * np.clip((v - 0.7) / 0.3, 0.0, 1.0))
    if anatomy.sex == "F":
        darken = darken - 0.10 * np.clip((v - 0.55) / 0.3, 0.0, 1.0) * np.clip((u - 0.3) / 0.4, 0.0, 1.0)
    img *= 1.0 - lung * darken

    # Lung markings: vessels fan out from the hila. Noise that varies fast in angle and slowly
    # in radius, around each hilum, has radial zero-crossings: |noise|≈0 traces the vessels.
    tex = np.random.default_rng(anatomy.texture_seed)
    polar = _smooth_noise(tex, (12, 120), (1.0, 1.0), wrap=True)
    hil_x = np.where(right_side, f32(-0.15), f32(0.15))
    hil_y = f32(-0.02)
    r = np.hypot(xa - hil_x, ya - hil_y)
    theta = np.arctan2(ya - hil_y, xa - hil_x)
    wiggle = _sample(polar, r * 6.0 + 3.0, (theta / (2 * np.pi)) % 1.0 * 120 + 60, mode="grid-wrap") * 0.04
    ridge = np.clip(1.0 - np.abs(_sample(polar, r * 10.0, (theta + wiggle) / (2 * np.pi) % 1.0 * 120 + right_side * 60, mode="grid-wrap")) * 1.6, 0.0, 1.0) ** 2
    vessels = ridge * np.exp(-r / 0.28) * 0.12 + 0.08 * np.exp(-((r / 0.12) ** 2))
    img += lung * vessels.astype(f32)

    # Central structures overwrite what lies behind them (the spine shows through faintly).
    central_val = 0.57 + 0.05 * thickness + 0.03 * np.clip((ya + 0.3) / 0.5, 0.0, 1.0)
    # Below the domes the abdomen takes over (no heart-shaped plug in the liver).
    img = np.where(central & (v <= diaphragm), central_val, img).astype(f32)
    trachea = (np.abs(xa - 0.005) < 0.035) & (ya < -0.25) & body
    img -= np.where(trachea, f32(0.08), f32(0.0))

    # --- bone.
    chest = body & (ax < lateral + 0.10) & (v < 1.15)
    spine = _band(xa, 0.05, max(pixel, 0.01)) * (0.7 + 0.3 * np.cos(2 * np.pi * (ya - 0.02) / 0.085)) * body
    spine *= np.where(central, f32(0.6), f32(1.0))  # seen only faintly through the heart
    # Posterior ribs: arcs that leave the spine, rise slightly, then sweep down laterally;
    # the spacing widens caudally (k-th rib at start + spacing * (k + 0.05 k^2)).
    w = (ya - (-0.12 * ax + anatomy.rib_curve * ax**2) - anatomy.rib_start) / anatomy.rib_spacing
    k = np.round((np.sqrt(1.0 + 0.2 * np.maximum(w, -4.9)) - 1.0) / 0.1)
    centre = k + 0.05 * k**2
    posterior = _band((w - centre) * anatomy.rib_spacing, 0.022 + 0.002 * k, max(pixel, 0.008)) * ((k >= 0) & (k <= 10) & (ax > 0.05))
    posterior *= np.clip(1.15 - 0.35 * ax, 0.0, 1.0)  # ribs fade laterally, where they turn
    # Anterior ribs: fainter, running down and inwards from the lateral wall.
    wa = ya + 0.55 * (ax - 0.85) - 0.30 * (ax - 0.85) ** 2
    pa = (wa - anatomy.rib_start - 0.25) / (anatomy.rib_spacing * 1.25)
    ka = np.round(pa)
    anterior = _band((pa - ka) * anatomy.rib_spacing * 1.25, 0.028, 0.02) * ((ka >= 0) & (ka <= 5) & (ax > 0.30))
    # Clavicles: from the sternal notch out and up to the shoulders; higher on AP films.
    t = ax - 0.06
    clav_y = anatomy.clavicle_y - (0.07 if view == "AP" else 0.0) - 0.30 * t + 0.10 * np.sin(np.pi * np.clip(t / 0.6, 0.0, 1.0)) * (t - 0.3)
    clavicle = _band(ya - clav_y, 0.018 + 0.01 * np.clip(1.0 - t / 0.2, 0.0, 1.0), max(pixel, 0.008)) * ((ax > 0.06) & (ax < 0.66)) * body
    hum_x = bw - 0.02
    hum_y = -1.0 + 0.36 * ((hum_x - 0.16) / 0.85) ** 1.3 + 0.17
    humerus = ((ax - hum_x) ** 2 + (ya - hum_y) ** 2) <= 0.13**2
    # Ribs stand out against air; over soft tissue and the abdomen they are barely seen.
    rib_weight = chest * (0.3 + 0.7 * lung)
    bone = 0.07 * spine + 0.09 * posterior * rib_weight + 0.045 * anterior * rib_weight + 0.14 * clavicle + 0.06 * (humerus & body)
    img += bone.astype(f32)

    # --- finding: added only where the lung mask is set.
    finding_map = _finding_map(finding, u, v, right_side, lung, pixel, lateral - medial)
    img += finding_map
    return img.astype(f32), mask, finding_map


def _finding_map(
    finding: Finding, u: np.ndarray, v: np.ndarray, right_side: np.ndarray, lung: np.ndarray, pixel: float, width: np.ndarray
) -> np.ndarray:
    """Opacity inside the lungs for ``finding`` (zero outside the mask)."""
    if finding.severity <= 0 or not finding.blobs:
        return np.zeros_like(lung)
    f32 = np.float32
    side = np.where(right_side, -1, 1)
    # No lesion narrower than ~1.2 px: sub-pixel nodules would alias into salt noise.
    min_s = float(1.2 * pixel / np.min(width))
    total = np.zeros_like(lung)
    for b_side, bu, bv, su, sv, weight in finding.blobs:
        su, sv = max(su, min_s), max(sv, min_s * 0.7)
        g = np.exp(-0.5 * (((u - bu) / su) ** 2 + ((v - bv) / sv) ** 2))
        total += np.where(side == b_side, f32(weight) * g, f32(0.0))
    tex_rng = np.random.default_rng(finding.texture_seed)
    patch = _smooth_noise(tex_rng, (20, 20), 1.2)
    texture = _sample(patch, np.clip(v, -0.5, 1.5) * 8 + 6, np.clip(u, -0.5, 1.5) * 8 + 6 + (side > 0) * 3)

    if finding.label == "covid":
        # Ground glass: hazy, patchy, strongest at the periphery.
        opacity = (1.0 - np.exp(-1.5 * total)) * np.clip((u - 0.25) / 0.5, 0.0, 1.0) ** 0.7
        opacity *= np.clip(0.55 + 0.35 * texture, 0.1, 1.0)
    elif finding.label == "pneumonia":
        # Consolidation: dense, with a defined margin and dark air bronchograms inside.
        opacity = 0.5 + 0.5 * np.tanh((total - 0.45) / 0.16)  # a sigmoid that cannot overflow
        opacity *= np.clip(0.85 + 0.15 * texture, 0.5, 1.0)
        bronchi = np.clip(1.0 - np.abs(texture) * 3.0, 0.0, 1.0) ** 2
        opacity *= 1.0 - 0.35 * bronchi
        if finding.fissure is not None:
            f_side, f_v = finding.fissure
            opacity = np.where(side == f_side, opacity * (0.5 + 0.5 * np.tanh((v - f_v) / 0.024)), opacity)
    else:  # other: nodules and fibrosis, optionally a thick-walled cavity
        opacity = np.clip(total, 0.0, 1.3) / 1.3
        if finding.cavity is not None:
            c_side, cu, cv, ru, rv = finding.cavity
            rad = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
            on = side == c_side
            wall = np.exp(-(((rad - 1.0) / 0.35) ** 2))
            hole = np.exp(-((rad / 0.75) ** 4))
            opacity = np.where(on, np.maximum(opacity * (1.0 - hole), 0.9 * wall), opacity)
    return (finding.severity * opacity * lung).astype(f32)


def _resolve_shortcut(shortcut_kind: str | ShortcutSpec | None) -> ShortcutSpec | None:
    if shortcut_kind is None or isinstance(shortcut_kind, ShortcutSpec):
        return shortcut_kind
    return ShortcutSpec(kind=shortcut_kind)


def render_phantom_detailed(
    rng: np.random.Generator,
    size: int = 256,
    label: str = "normal",
    site: SiteProfile = DEFAULT_SITES[0],
    shortcut_applied: bool = False,
    shortcut_kind: str | ShortcutSpec | None = None,
    *,
    view: str | None = None,
    anatomy: Anatomy | None = None,
    severity: float | None = None,
) -> Phantom:
    """Render one phantom and return it with its parts; see `render_phantom`.

    ``rng`` is split at once into four independent streams — anatomy, finding, acquisition,
    shortcut — so for one ``rng`` state the label changes only the finding, and the
    shortcut changes only the shortcut: the two renders are pixel-identical elsewhere.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    spec = _resolve_shortcut(shortcut_kind)
    if shortcut_applied and spec is None:
        raise ValueError("shortcut_applied=True needs a shortcut_kind ('marker', 'window' or a ShortcutSpec)")
    streams = [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=4)]
    anatomy_rng, finding_rng, acq_rng, shortcut_rng = streams
    if anatomy is None:
        anatomy = sample_anatomy(anatomy_rng)
    finding = sample_finding(finding_rng, label, anatomy, severity)

    # --- acquisition geometry: positioning (shift, rotation), inspiration, zoom, view.
    a = acq_rng.random(8)
    if view is None:
        view = "AP" if a[0] < site.ap_rate else "PA"
        if spec is not None and spec.kind == "view" and shortcut_applied:
            view = "AP"
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    # Source-detector distance and detector size vary film to film: ±3% magnification.
    # Without it, phantoms of different patients are closer than real radiographs are
    # (their perceptual hashes collide: see covidcxr.data.dedup's calibration).
    zoom = site.field_of_view * anatomy.habitus * (0.97 + 0.06 * a[5])
    shift = (a[1:3] * 2.0 - 1.0) * site.offset_jitter / 128.0  # px at 256 → [-1, 1] units
    angle = math.radians((a[3] * 2.0 - 1.0) * (4.0 if view == "AP" else 2.0))
    inspiration = (0.92 + 0.08 * a[4]) if view == "AP" else (0.96 + 0.08 * a[4])
    xs, ys = _pixel_grid(size)
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xs - np.float32(shift[0]), ys - np.float32(shift[1])
    xa = ((c * dx + s * dy) / zoom).astype(np.float32)
    ya = ((-s * dx + c * dy) / zoom).astype(np.float32)
    pixel = 2.0 / size / zoom  # one pixel in anatomical units

    raw, mask, finding_map = _draw_chest(xa, ya, anatomy, finding, view, inspiration, pixel)

    # --- acquisition intensities: heel effect, blur, contrast/brightness, gamma, window.
    img = raw * (1.0 + np.float32(site.heel_effect) * ys)
    blur = site.blur_sigma * size / 256.0
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, blur, mode="nearest")
    img = np.clip(0.5 + site.contrast * (img - 0.5) + site.brightness, 0.0, 1.0)
    if site.gamma != 1.0:
        img = img ** np.float32(site.gamma)
    sc = shortcut_rng.random(4)
    if shortcut_applied and spec is not None and spec.kind == "window":
        # A different window/level: brighter and flatter, as from another scanner's LUT.
        lo, hi = 0.15 + 0.05 * sc[0], 0.90 + 0.05 * sc[1]
        img = lo + (hi - lo) * img
    noise = acq_rng.standard_normal((size, size), dtype=np.float32)
    img = np.clip(img + np.float32(site.noise_sigma) * noise, 0.0, 1.0).astype(np.float32)

    marker = np.zeros((size, size), dtype=bool)
    if shortcut_applied and spec is not None and spec.kind == "marker":
        marker = _marker_mask(size, mask, spec, sc)
        img[marker] = np.float32(0.93 + 0.05 * sc[2])
    return Phantom(img, mask, finding_map, marker, finding.description, finding.severity, view, bool(shortcut_applied))


def _marker_mask(size: int, lung: np.ndarray, spec: ShortcutSpec, u: np.ndarray) -> np.ndarray:
    """Pixels of a burned-in text block in a top corner, kept clear of the lungs.

    The corner is air above the shoulders at every default field of view; as a guarantee,
    any marker pixel within a few pixels of the lung mask is dropped.
    """
    scale = max(1, round(size / 128))
    bitmap = _text_bitmap(spec.text, scale)
    h, w = bitmap.shape
    h, w = min(h, size // 3), min(w, size // 2)
    bitmap = bitmap[:h, :w]
    margin = max(1, round(size * 0.02))
    row = margin + int(u[3] * 2 * scale)
    col = size - margin - w - int(u[0] * 2 * scale) if spec.corner == "top_right" else margin + int(u[0] * 2 * scale)
    out = np.zeros((size, size), dtype=bool)
    out[row : row + h, col : col + w] = bitmap
    clear = 3 * scale
    r0, r1, c0, c1 = max(row - clear, 0), min(row + h + clear, size), max(col - clear, 0), min(col + w + clear, size)
    near = ndimage.binary_dilation(lung[r0:r1, c0:c1], iterations=clear)
    out[r0:r1, c0:c1] &= ~near
    return out


def render_phantom(
    rng: np.random.Generator,
    size: int = 256,
    label: str = "normal",
    site: SiteProfile = DEFAULT_SITES[0],
    shortcut_applied: bool = False,
    shortcut_kind: str | ShortcutSpec | None = None,
    *,
    view: str | None = None,
    anatomy: Anatomy | None = None,
    severity: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic chest radiograph and its exact lung mask.

    Args:
        rng: the image's generator; it is split into independent anatomy, finding,
            acquisition and shortcut streams, so two renders from the same state differ
            only in what their arguments change.
        size: side of the square image in pixels (≥ 32).
        label: one of `LABELS`; decides the finding drawn inside the lungs.
        site: the `SiteProfile` whose acquisition is applied.
        shortcut_applied: whether this image carries the shortcut.
        shortcut_kind: ``"marker"``, ``"window"`` or a `ShortcutSpec` (for the marker's
            text and corner); needed when ``shortcut_applied``.
        view: ``"PA"`` or ``"AP"``; drawn from ``site.ap_rate`` when None.
        anatomy: the patient (for follow-up films); drawn from ``rng`` when None.
        severity: the finding's peak opacity; drawn from the label's range when None.

    Returns:
        ``(image, lung_mask)``: ``(size, size)`` float32 in [0, 1] and ``(size, size)`` bool.

    Example:
        >>> img, mask = render_phantom(np.random.default_rng(1), 64, "pneumonia", DEFAULT_SITES[2])
        >>> img.shape, bool(0.0 <= img.min() and img.max() <= 1.0), 0.1 < float(mask.mean()) < 0.4
        ((64, 64), True, True)
    """
    phantom = render_phantom_detailed(
        rng, size, label, site, shortcut_applied, shortcut_kind, view=view, anatomy=anatomy, severity=severity
    )
    return phantom.image, phantom.mask


# --------------------------------------------------------------------------------------
# Writing a collection
# --------------------------------------------------------------------------------------


def _split_counts(n_images: int | None, per_site: int | None, n_sites: int) -> list[int]:
    if n_sites == 0:
        raise ValueError("need at least one site")
    if per_site is not None and n_images is not None:
        raise ValueError("give n_images (the total) or per_site, not both")
    if per_site is not None:
        if per_site < 0:
            raise ValueError(f"per_site must be >= 0, got {per_site}")
        return [per_site] * n_sites
    total = 300 if n_images is None else n_images
    if total < 0:
        raise ValueError(f"n_images must be >= 0, got {total}")
    return [total // n_sites + (1 if k < total % n_sites else 0) for k in range(n_sites)]


def plan_synthesis(
    n_images: int | None = None,
    *,
    per_site: int | None = None,
    sites: Sequence[SiteProfile] = DEFAULT_SITES,
    shortcut: ShortcutSpec | None = None,
    seed: int = 0,
    images_per_patient: tuple[int, int] = (1, 2),
) -> pd.DataFrame:
    """Decide every image of a collection — site, patient, label, view, shortcut — without pixels.

    Each site's plan is drawn from its own seed, and every image draws its shortcut coin
    whether or not a shortcut is set, so the plan (patients, labels, views) is the same for
    one seed with or without a shortcut; only the ``shortcut`` column changes.

    Args:
        n_images: total number of images, split as evenly as possible among the sites
            (300 when neither this nor ``per_site`` is given).
        per_site: number of images per site, instead of ``n_images``.
        sites: the site profiles.
        shortcut: the planted shortcut, or None.
        seed: the collection's seed.
        images_per_patient: ``(min, max)`` films per patient; each patient gets ``min``
            plus Binomial(max - min, 0.35) follow-ups (the last patient of a site is cut
            to fit the count).

    Returns:
        One row per image: ``index`` (global, the image's seed), ``image_id``, ``site``,
        ``site_index``, ``patient_no``, ``film`` (0 first, 1.. follow-ups), ``label``,
        ``sex``, ``age``, ``view``, ``shortcut``.

    Example:
        >>> plan = plan_synthesis(30, shortcut=ShortcutSpec("marker"))
        >>> len(plan), sorted(plan["site"].unique())
        (30, ['site_a', 'site_b', 'site_c'])
    """
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_patient must be (min, max) with 1 <= min <= max, got {images_per_patient}")
    rows: list[dict[str, object]] = []
    index = 0
    for k, (site, count) in enumerate(zip(sites, _split_counts(n_images, per_site, len(sites)))):
        rng = np.random.default_rng([seed, _TAG_PLAN, k])
        labels = [lab for lab in LABELS if site.label_mix.get(lab, 0.0) > 0]
        probs = np.array([site.label_mix[lab] for lab in labels], dtype=float)
        probs /= probs.sum()
        patient_no, made = 0, 0
        while made < count:
            patient_no += 1
            label = labels[int(rng.choice(len(labels), p=probs))]
            films = min(lo + int(rng.binomial(hi - lo, 0.35)), count - made)
            sex = "F" if rng.random() < 0.5 else "M"
            age = float(np.clip(np.round(rng.normal(54.0, 17.0)), 18, 95))
            for film in range(films):
                view = "AP" if rng.random() < site.ap_rate else "PA"
                coin = rng.random()  # always drawn: the plan must not depend on the shortcut
                carries = shortcut is not None and coin < shortcut.probability(label, site.name)
                if shortcut is not None and shortcut.kind == "view" and shortcut.probability(label, site.name) > 0:
                    view = "AP" if carries else "PA"  # the projection follows the label (DeGrave et al. 2021)
                rows.append(
                    {
                        "index": index,
                        "image_id": f"{site.name}_p{patient_no:04d}_{film}",
                        "site": site.name,
                        "site_index": k,
                        "patient_no": patient_no,
                        "film": film,
                        "label": label,
                        "sex": sex,
                        "age": age,  # a follow-up is days or weeks later: same age
                        "view": view,
                        "shortcut": bool(carries),
                    }
                )
                index += 1
                made += 1
    return pd.DataFrame(
        rows,
        columns=["index", "image_id", "site", "site_index", "patient_no", "film", "label", "sex", "age", "view", "shortcut"],
    )


def _config(sites: Sequence[SiteProfile], shortcut: ShortcutSpec | None, seed: int, size: int, counts: list[int], images_per_patient: tuple[int, int]) -> dict[str, object]:
    return {
        "generator": "covidcxr.data.synth",
        "synth_version": SYNTH_VERSION,
        "seed": int(seed),
        "size": int(size),
        "images_per_site": [int(c) for c in counts],
        "n_images": int(sum(counts)),
        "images_per_patient": [int(images_per_patient[0]), int(images_per_patient[1])],
        "sites": [site.to_dict() for site in sites],
        "shortcut": None if shortcut is None else shortcut.to_dict(),
    }


def synthesize(
    out_dir: str | Path,
    n_images: int | None = None,
    *,
    per_site: int | None = None,
    sites: Sequence[SiteProfile] = DEFAULT_SITES,
    size: int = 256,
    shortcut: ShortcutSpec | None = None,
    seed: int = 0,
    images_per_patient: tuple[int, int] = (1, 2),
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    finding_scale: float = 1.0,
) -> pd.DataFrame:
    """Write a phantom collection readable by ``covidcxr.data.sources.load_source``.

    Layout: ``out_dir/images/<id>.png`` (8-bit), ``out_dir/masks/<id>.png`` (0/255),
    ``out_dir/manifest.csv`` (canonical columns; ``source`` = site, ``patient_id`` =
    ``"<site>:p0001"``; extra columns ``shortcut``, ``synthetic``, ``severity``),
    ``out_dir/README.md`` and ``out_dir/synth_config.json``.

    Resumable: ``synth_config.json`` is written first; a later call with the same
    parameters skips images whose PNG and mask already exist (writes are atomic, so an
    existing file is complete) and produces the identical manifest. A folder made with
    other parameters is refused unless ``overwrite`` (then every image is redrawn).

    Args:
        out_dir: the folder to write (created if needed).
        n_images: total images, split evenly among the sites (default 300).
        per_site: images per site, instead of ``n_images``.
        sites: the site profiles.
        size: image side in pixels.
        shortcut: the planted shortcut, or None (the default: no shortcut).
        seed: the collection's seed; the same seed gives byte-identical files.
        images_per_patient: ``(min, max)`` films per patient (see `plan_synthesis`).
        progress: called with 1 after each image (e.g. a rich progress bar's advance).
        overwrite: redraw a folder whose ``synth_config.json`` has other parameters.
        finding_scale: multiplies every drawn finding severity (peak opacity); 1.0 keeps the
            default ranges. A stronger finding (e.g. 2.0) lets a small model at 64 px learn the
            disease in a few epochs — what the audit-accuracy benchmark needs: a clean model
            with real skill. Only the finding changes; anatomy, acquisition and shortcut draws
            are the same.

    Returns:
        The manifest as written (absolute paths, as `make_manifest` returns them).

    Raises:
        FileExistsError: ``out_dir`` holds a collection made with other parameters.

    Example:
        >>> table = synthesize("/tmp/phantoms", n_images=30, size=128, shortcut=ShortcutSpec("marker", site="site_c"))  # doctest: +SKIP
        >>> table.groupby(["source", "label"]).size()  # doctest: +SKIP
    """
    out = Path(out_dir)
    sites = tuple(sites)
    plan = plan_synthesis(n_images, per_site=per_site, sites=sites, shortcut=shortcut, seed=seed, images_per_patient=images_per_patient)
    counts = [int((plan["site"] == site.name).sum()) for site in sites]
    if not finding_scale > 0:
        raise ValueError(f"finding_scale must be positive; got {finding_scale}")
    config = _config(sites, shortcut, seed, size, counts, images_per_patient)
    if finding_scale != 1.0:
        config["finding_scale"] = float(finding_scale)  # absent at 1.0: folders made before the option keep their config
    config_path = out / "synth_config.json"
    reuse = True
    if config_path.is_file():
        try:
            previous = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
        if previous != json.loads(json.dumps(config)):
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds phantoms made with other parameters ({config_path}); "
                    "choose another folder or pass overwrite=True to redraw them"
                )
            reuse = False
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if not reuse:
        # Redrawing: drop PNGs the new plan does not name, so the folder holds one collection.
        wanted = {f"{image_id}.png" for image_id in plan["image_id"]}
        for folder in (out / "images", out / "masks"):
            for stale in folder.glob("*.png"):
                if stale.name not in wanted:
                    stale.unlink()
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")

    by_name = {site.name: site for site in sites}
    records: list[dict[str, object]] = []
    anatomy_cache: dict[tuple[int, int], Anatomy] = {}
    for row in plan.itertuples(index=False):
        image_path = (out / "images" / f"{row.image_id}.png").resolve()
        mask_path = (out / "masks" / f"{row.image_id}.png").resolve()
        key = (int(row.site_index), int(row.patient_no))
        if key not in anatomy_cache:
            anatomy_cache.clear()  # films of a patient are consecutive: keep only the current one
            anatomy_cache[key] = sample_anatomy(np.random.default_rng([seed, _TAG_PATIENT, *key]), sex=row.sex)
        anatomy = anatomy_cache[key]
        if reuse and image_path.is_file() and mask_path.is_file():
            # Resume: the finding text and severity come from the cheap finding draw, which
            # is the same stream render_phantom would use for this image.
            streams = np.random.default_rng([seed, int(row.index)]).integers(0, 2**63 - 1, size=4)
            finding = sample_finding(np.random.default_rng(int(streams[1])), row.label, anatomy)
            description, severity = finding.description, finding.severity * finding_scale
        else:
            scaled = None
            if finding_scale != 1.0:
                # the same draw render_phantom makes (the finding stream), scaled
                streams = np.random.default_rng([seed, int(row.index)]).integers(0, 2**63 - 1, size=4)
                scaled = sample_finding(np.random.default_rng(int(streams[1])), row.label, anatomy).severity * finding_scale
            phantom = render_phantom_detailed(
                np.random.default_rng([seed, int(row.index)]),
                size,
                row.label,
                by_name[row.site],
                bool(row.shortcut),
                shortcut,
                view=row.view,
                anatomy=anatomy,
                severity=scaled,
            )
            write_png(image_path, phantom.image)
            write_png(mask_path, phantom.mask)
            description, severity = phantom.finding, phantom.severity
        records.append(
            {
                "image": str(image_path),
                "mask": str(mask_path),
                "source": row.site,
                "label": row.label,
                "finding": description,
                "patient_id": f"{row.site}:p{row.patient_no:04d}",
                "view": row.view,
                "sex": row.sex,
                "age": row.age,
                "sha1": file_sha1(image_path),
                "dup_group": None,
                "shortcut": bool(row.shortcut),
                "synthetic": True,
                "severity": round(float(severity), 6),
            }
        )
        if progress is not None:
            progress(1)
    columns = ["image", "mask", "source", "label", "finding", "patient_id", "view", "sex", "age", "sha1", "dup_group", "shortcut", "synthetic", "severity"]
    manifest = make_manifest(pd.DataFrame(records, columns=columns))
    manifest["shortcut"] = manifest["shortcut"].astype(bool)
    manifest["synthetic"] = manifest["synthetic"].astype(bool)
    write_manifest(manifest, out / "manifest.csv")
    atomic_write_text(out / "README.md", _readme(manifest, config, sites, shortcut))
    return manifest


def _readme(manifest: pd.DataFrame, config: dict[str, object], sites: Sequence[SiteProfile], shortcut: ShortcutSpec | None) -> str:
    counts = manifest.groupby(["source", "label"]).size().unstack(fill_value=0).reindex(columns=list(LABELS), fill_value=0)
    lines = [
        "# Synthetic chest X-ray phantoms",
        "",
        "Generated by `covidcxr.data.synth` — **synthetic images, not patient data, not for medical use.**",
        "Each image is an analytic drawing of a frontal chest radiograph with an exact lung mask",
        "(heart and mediastinum excluded). The label's finding lies only inside the lungs; the site",
        "changes only the acquisition; a planted shortcut (if any) lies only outside the lungs or in",
        "the global intensity window. See the `covidcxr.data.synth` module docstring for details.",
        "",
        "## Parameters",
        "",
        f"- seed: {config['seed']}",
        f"- size: {config['size']} px",
        f"- images: {len(manifest)} from {manifest['patient_id'].nunique()} patients "
        f"(films per patient {tuple(config['images_per_patient'])})",
        f"- generator version: {config['synth_version']}",
        f"- shortcut: {'none' if shortcut is None else shortcut}",
        f"- images carrying the shortcut: {int(manifest['shortcut'].sum())}",
        "",
        "## Sites",
        "",
        "| site | contrast | gamma | brightness | noise | blur (px@256) | field of view | jitter (px@256) | AP share | description |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        lines.append(
            f"| {s.name} | {s.contrast} | {s.gamma} | {s.brightness} | {s.noise_sigma} | {s.blur_sigma} | "
            f"{s.field_of_view} | {s.offset_jitter} | {s.ap_rate} | {s.description} |"
        )
    lines += ["", "## Images per site and label", "", "| site | " + " | ".join(counts.columns) + " |", "|---" * (len(counts.columns) + 1) + "|"]
    for site_name, row in counts.iterrows():
        lines.append(f"| {site_name} | " + " | ".join(str(int(v)) for v in row) + " |")
    lines += [
        "",
        "## Files",
        "",
        "- `images/<id>.png`: 8-bit greyscale radiographs; `masks/<id>.png`: lung masks (0/255).",
        "- `manifest.csv`: covidcxr's canonical manifest plus `shortcut`, `synthetic`, `severity`.",
        "- `synth_config.json`: every parameter; rerunning with it reproduces the files byte for byte.",
        "",
    ]
    return "\n".join(lines)


def synthetic_fingerprints(
    count: int, duplicate_share: float = 0.01, seed: int = 0, batch: int = 2048
) -> tuple["Fingerprints", np.ndarray]:
    """Fingerprints of ``count`` synthetic radiograph-like images with planted near-duplicates.

    For scale tests of the near-duplicate search (`covidcxr.data.dedup`) without 100k
    files: each image is a 64×64 random field with a 1/f amplitude spectrum (the spectrum
    of natural images and radiographs; Field 1987, J Opt Soc Am A 4:2379) over a shared
    chest-like template, so, as in a real collection, images resemble each other and the
    low-frequency hash bits are far from uniform. Its 256-bit DCT hash is computed exactly
    as `imagehash.phash` does on a 64×64 image, its 8-bit thumbnail as `covidcxr.data.dedup.fingerprint`.
    A ``duplicate_share`` of the images are copies of an earlier image re-windowed
    (gain 0.7–1.3, offset ±0.1, gamma 0.7–1.4) with pixel noise (σ 0–0.06).

    Args:
        count: number of fingerprints.
        duplicate_share: fraction of images that are near-duplicates of another.
        seed: random seed (the result is deterministic).
        batch: images rendered at once (bounds memory).

    Returns:
        ``(prints, planted)``: `Fingerprints` with ``count`` rows and ``(k, 2)`` int64 rows
        ``(original, copy)``.

    Example:
        >>> prints, planted = synthetic_fingerprints(200, duplicate_share=0.05)
        >>> len(prints), planted.shape
        (200, (10, 2))
    """
    from scipy.fft import dct, irfft2

    from covidcxr.data.dedup import THUMBNAIL_SIZE, Fingerprints

    rng = np.random.default_rng(seed)
    side = 64
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.rfftfreq(side), indexing="ij")
    amplitude = (1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side)).astype(np.float32)
    amplitude[0, 0] = 0.0
    yy, xx = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    template = 0.6 - 0.35 * (np.exp(-(((np.abs(xx) - 0.45) / 0.25) ** 2 + (yy / 0.6) ** 2)))  # two dark lungs
    n_copies = int(round(count * duplicate_share))
    copies = np.sort(rng.choice(np.arange(1, count), n_copies, replace=False)) if n_copies else np.zeros(0, np.int64)
    originals = np.array([rng.integers(0, c) for c in copies], dtype=np.int64)
    # A copy's original must not itself be a copy, so each planted pair is an original and its copy.
    is_copy = set(copies.tolist())
    originals = np.array([o if o not in is_copy else 0 for o in originals.tolist()], dtype=np.int64)
    planted = np.column_stack([originals, copies]).astype(np.int64)
    source_of = dict(zip(copies.tolist(), originals.tolist()))

    hashes = np.zeros((count, 4), np.uint64)
    thumbnails = np.zeros((count, THUMBNAIL_SIZE * THUMBNAIL_SIZE), np.uint8)
    rendered: dict[int, np.ndarray] = {}
    needed = set(originals.tolist())
    for start in range(0, count, batch):
        stop = min(start + batch, count)
        shape = (stop - start, side, side // 2 + 1)  # half spectrum of a real field
        noise = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
        field = irfft2(noise * amplitude, s=(side, side))
        field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
        images = np.clip(template * rng.uniform(0.7, 1.3, (stop - start, 1, 1)) + 0.12 * field, 0, 1)
        for index in range(start, stop):
            if index in source_of:
                original = rendered[source_of[index]]
                gain, offset, gamma = rng.uniform(0.7, 1.3), rng.uniform(-0.1, 0.1), rng.uniform(0.7, 1.4)
                copy = np.clip(original * gain + offset, 0, 1) ** gamma + rng.normal(0, rng.uniform(0, 0.06), original.shape)
                images[index - start] = np.clip(copy, 0, 1)
            if index in needed:
                rendered[index] = images[index - start].copy()
        pixels = np.round(images * 255).astype(np.uint8)
        coefficients = dct(dct(pixels.astype(np.float32), axis=1), axis=2)[:, :16, :16].reshape(len(pixels), -1)
        bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
        hashes[start:stop] = np.packbits(bits, axis=1).view(">u8").astype(np.uint64)
        thumbs = pixels.reshape(len(pixels), THUMBNAIL_SIZE, 2, THUMBNAIL_SIZE, 2).mean(axis=(2, 4)).round()
        thumbnails[start:stop] = thumbs.reshape(len(pixels), -1).astype(np.uint8)  # 8-bit, as the cache holds them
    return Fingerprints(hashes, thumbnails, np.ones(count, bool)), planted
