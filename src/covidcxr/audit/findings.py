"""Plain-language findings: each audit number turned into a sentence, a severity and the rule used.

A finding is a dict ``{"id", "severity", "text", "value", "threshold"}``. Severities:

- ``shortcut``: the evidence says the model's score does not come from the lungs' content
  (e.g. it keeps its AUC with the lungs blanked, or it is no better than a source detector);
- ``warning``: a risk worth a look (source recognisable from the embedding, saliency
  mostly outside the lungs, a large gap between seen and unseen sources);
- ``info``: context (a check that does not apply to this run, and why);
- ``ok``: the check ran and found nothing.

Each rule is a small function of the numbers; the thresholds are module constants so a
reader can see (and a reviewer can argue with) exactly what triggers a finding. Every
rule requires the confidence interval, not only the point estimate, to clear its bar, so
a small test set yields "not enough evidence" rather than a false alarm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SEVERITIES", "derive_findings", "verdict"]

SEVERITIES = ("shortcut", "warning", "info", "ok")

#: data are called confounded when the source alone predicts the label at least this well
CONFOUNDED_SOURCE_AUC = 0.70
#: lungs-blanked within-source AUC whose CI lower bound above this means outside-lung signal
OUTSIDE_LUNG_AUC_LOW = 0.55
#: ... and whose estimate reaches this
OUTSIDE_LUNG_AUC = 0.65
#: a source probe whose balanced-accuracy CI lower bound exceeds chance by this much
PROBE_MARGIN = 0.20
#: lungs-only AUC this far below the original AUC (CI high below original - drop)
LUNGS_ONLY_DROP = 0.10
#: seen - unseen AUC gap (with DeLong p below ``GAP_ALPHA``) called a failure to generalise
UNSEEN_GAP = 0.10
GAP_ALPHA = 0.05


def _estimate(part: Mapping[str, Any] | None, key: str | None = None) -> tuple[float, float, float] | None:
    """(estimate, low, high) of ``part[key]`` (or ``part``), None when absent/undefined."""
    if not part:
        return None
    value = part.get(key) if key else part
    if not isinstance(value, Mapping) or value.get("estimate") is None:
        return None
    low = value.get("low")
    high = value.get("high")
    est = float(value["estimate"])
    return est, float(low if low is not None else est), float(high if high is not None else est)


def _fmt(triple: tuple[float, float, float]) -> str:
    return f"{triple[0]:.2f} [{triple[1]:.2f}, {triple[2]:.2f}]"


def _finding(id_: str, severity: str, text: str, value: float | None = None, threshold: float | None = None) -> dict[str, Any]:
    return {"id": id_, "severity": severity, "text": text, "value": value, "threshold": threshold}


def _source_detector(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    baseline = _estimate(evaluation.get("source_only"))
    pooled = _estimate(evaluation.get("overall"), "auc")
    if baseline is None or pooled is None:
        return []
    prevalence = (evaluation.get("source_only") or {}).get("prevalence") or {}
    rates = ", ".join(f"{s} {100 * r:.0f}%" for s, r in sorted(prevalence.items(), key=lambda kv: -kv[1]))
    if baseline[0] < CONFOUNDED_SOURCE_AUC:
        return [_finding("source_detector_baseline", "ok", f"The source alone predicts the label only weakly here (AUC {_fmt(baseline)}): pooled metrics are not dominated by source recognition.", baseline[0], CONFOUNDED_SOURCE_AUC)]
    if pooled[1] <= baseline[0]:
        return [_finding(
            "source_detector_baseline",
            "shortcut",
            f"Recognising the source alone would score AUC {baseline[0]:.2f} on this test set (positive rate in training: {rates}); "
            f"the model's AUC {_fmt(pooled)} is no better. Its pooled AUC is not evidence that it reads the lungs.",
            baseline[0],
            CONFOUNDED_SOURCE_AUC,
        )]
    return [_finding(
        "source_detector_baseline",
        "warning",
        f"The data are confounded: the source alone predicts the label with AUC {baseline[0]:.2f} (positive rate in training: {rates}). "
        f"The model's AUC {_fmt(pooled)} is above that, but read the within-source numbers, not the pooled ones.",
        baseline[0],
        CONFOUNDED_SOURCE_AUC,
    )]


def _within_source(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    within = _estimate(evaluation.get("within_source"))
    pooled = _estimate(evaluation.get("overall"), "auc")
    if within is None or pooled is None:
        return []
    sources = ", ".join((evaluation.get("within_source") or {}).get("sources") or [])
    if within[1] <= 0.5 < pooled[1]:
        return [_finding(
            "within_source_auc",
            "shortcut",
            f"Comparing only images from the same source ({sources}), the model's AUC is {_fmt(within)} — not distinguishable from chance — "
            f"while the pooled AUC is {_fmt(pooled)}: what it learned separates sources, not diagnoses.",
            within[0],
            0.5,
        )]
    if pooled[0] - within[0] > UNSEEN_GAP and within[2] < pooled[0]:
        return [_finding(
            "within_source_auc",
            "warning",
            f"Within a source ({sources}) the AUC is {_fmt(within)} against {_fmt(pooled)} pooled: part of the pooled AUC comes from telling sources apart.",
            within[0],
            pooled[0],
        )]
    return [_finding("within_source_auc", "ok", f"Within-source AUC {_fmt(within)} is close to the pooled {_fmt(pooled)}.", within[0], pooled[0])]


def _seen_unseen(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    gap = (evaluation.get("seen_unseen") or {}).get("gap") or {}
    if gap.get("auc_diff") is None:
        return []
    diff, p = float(gap["auc_diff"]), gap.get("p_value")
    text = f"AUC on sources seen in training {gap['auc_seen']:.2f} vs unseen {gap['auc_unseen']:.2f} (DeLong p = {p:.3g})."
    if diff > UNSEEN_GAP and p is not None and p < GAP_ALPHA:
        return [_finding("seen_unseen_gap", "shortcut", text + " The model does not carry over to new sources (Maguolo & Nanni 2021; Ben Ahmed et al. 2021).", diff, UNSEEN_GAP)]
    return [_finding("seen_unseen_gap", "ok", text + " No significant drop on unseen sources.", diff, UNSEEN_GAP)]


def _ablation(ablation: Mapping[str, Any], lungs_mode: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    original = (ablation or {}).get("original") or {}
    blanked = (ablation or {}).get("lungs_blanked") or {}
    lungs_only = (ablation or {}).get("lungs_only") or {}
    if "skipped" in blanked:
        out.append(_finding("outside_lung_signal", "info", f"Lung blanking does not apply: {blanked['skipped']}. Outside-lung shortcuts such as text markers are excluded by construction; the lung silhouette and intensities can still carry the source."))
    else:
        within = _estimate(blanked.get("within_source_auc")) or _estimate(blanked, "auc")
        kept = _estimate(original.get("within_source_auc")) or _estimate(original, "auc")
        # a shortcut planted at one site shows in that site's numbers before the pooled ones
        flagged_sources = {
            source: triple
            for source, auc in (blanked.get("per_source_auc") or {}).items()
            if (triple := _estimate(auc)) is not None and triple[1] > OUTSIDE_LUNG_AUC_LOW and triple[0] >= OUTSIDE_LUNG_AUC
        }
        pooled_flag = within is not None and within[1] > OUTSIDE_LUNG_AUC_LOW and within[0] >= OUTSIDE_LUNG_AUC
        if flagged_sources and not pooled_flag:
            where = "; ".join(f"{s}: AUC {_fmt(t)}" for s, t in sorted(flagged_sources.items()))
            with_lungs = {s: _estimate(a) for s, a in (original.get("per_source_auc") or {}).items()}
            kept_text = ", ".join(f"{s} {with_lungs[s][0]:.2f}" for s in sorted(flagged_sources) if with_lungs.get(s))
            out.append(_finding(
                "outside_lung_signal",
                "shortcut",
                f"With the lungs blanked out, the model still separates the classes at {', '.join(sorted(flagged_sources))} ({where}; with the lungs: {kept_text}). "
                "At that source it uses pixels outside the lungs — text markers, borders, devices, body habitus.",
                max(t[0] for t in flagged_sources.values()),
                OUTSIDE_LUNG_AUC_LOW,
            ))
        elif within is not None:
            with_lungs = f" (with the lungs: {kept[0]:.2f})" if kept else ""
            if within[1] > OUTSIDE_LUNG_AUC_LOW and within[0] >= OUTSIDE_LUNG_AUC:
                out.append(_finding(
                    "outside_lung_signal",
                    "shortcut",
                    f"With the lungs blanked out, the model still separates the classes within each source: AUC {_fmt(within)}{with_lungs}. "
                    "It uses pixels outside the lungs — text markers, borders, devices, body habitus.",
                    within[0],
                    OUTSIDE_LUNG_AUC_LOW,
                ))
            elif within[1] > 0.5:
                out.append(_finding("outside_lung_signal", "warning", f"With the lungs blanked out, some discrimination remains within sources: AUC {_fmt(within)}{with_lungs}.", within[0], OUTSIDE_LUNG_AUC_LOW))
            else:
                out.append(_finding("outside_lung_signal", "ok", f"With the lungs blanked out, the model's within-source AUC falls to {_fmt(within)}{with_lungs}: no usable signal outside the lungs.", within[0], OUTSIDE_LUNG_AUC_LOW))
    full = _estimate(original, "auc")
    only = _estimate(lungs_only, "auc")
    if full is not None and only is not None and lungs_mode != "mask":
        if full[1] > 0.6 and only[2] < full[0] - LUNGS_ONLY_DROP:
            out.append(_finding("lungs_only", "warning", f"Shown only its lungs, the model's AUC falls from {_fmt(full)} to {_fmt(only)}: its decision depends on what lies outside them.", only[0], full[0] - LUNGS_ONLY_DROP))
        else:
            out.append(_finding("lungs_only", "ok", f"Shown only its lungs, the model keeps AUC {_fmt(only)} (full image {_fmt(full)}).", only[0], full[0] - LUNGS_ONLY_DROP))
    return out


def _probe(probe: Mapping[str, Any], confounded: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    labels = {"full": "the model's embedding", "lungs_blanked": "outside-lung pixels (lungs blanked)", "lungs_only": "the lungs alone"}
    for part, where in labels.items():
        result = (probe or {}).get(part) or {}
        ba = _estimate(result, "balanced_accuracy")
        if ba is None:
            continue
        chance = float(result["chance"])
        id_ = f"source_probe_{part}"
        if ba[1] > chance + PROBE_MARGIN:
            risky = part != "lungs_only" and confounded
            severity = "shortcut" if risky and part == "lungs_blanked" else "warning"
            tail = (
                "; the label's rate differs between these sources, so this is a likely shortcut"
                if risky
                else "; harmless only while every source has the same mix of labels"
            )
            out.append(_finding(id_, severity, f"The source is predictable from {where} with balanced accuracy {_fmt(ba)} (chance {chance:.2f}, {result['n_sources']} sources){tail}.", ba[0], chance + PROBE_MARGIN))
        else:
            out.append(_finding(id_, "ok", f"The source is not reliably predictable from {where}: balanced accuracy {_fmt(ba)} (chance {chance:.2f}).", ba[0], chance + PROBE_MARGIN))
    return out


def _saliency(saliency: Mapping[str, Any]) -> list[dict[str, Any]]:
    overall = (saliency or {}).get("overall") or {}
    focus, area = overall.get("lung_focus_median"), overall.get("lung_area_median")
    if focus is None or area is None:
        return []
    empty = overall.get("n_empty", 0)
    note = f" ({empty} of {overall.get('n')} maps were empty and are left out)" if empty else ""
    if focus < area:
        return [_finding("saliency_outside_lungs", "warning", f"Grad-CAM puts a median {100 * focus:.0f}% of its mass inside the lungs, which cover {100 * area:.0f}% of the input — less than a uniform map would: the evidence the model uses lies mostly outside the lungs{note}.", focus, area)]
    return [_finding("saliency_outside_lungs", "ok", f"Grad-CAM puts a median {100 * focus:.0f}% of its mass inside the lungs (which cover {100 * area:.0f}% of the input){note}.", focus, area)]


def derive_findings(
    evaluation: Mapping[str, Any] | None,
    ablation: Mapping[str, Any] | None,
    probe: Mapping[str, Any] | None,
    saliency: Mapping[str, Any] | None,
    lungs_mode: str = "none",
) -> list[dict[str, Any]]:
    """Every finding of one audit, most severe first.

    Args:
        evaluation: `covidcxr.evaluate.cross_source.evaluate_run`'s report.
        ablation: `covidcxr.audit.ablation.lung_ablation`'s result.
        probe: ``{"full"|"lungs_blanked"|"lungs_only": source_probe result}``.
        saliency: ``{"overall": {"lung_focus_median", "lung_area_median", "n", "n_empty"}}``.
        lungs_mode: the run's ``preprocess.lungs`` (``none``, ``mask`` or ``crop``).
    """
    evaluation = evaluation or {}
    baseline = _estimate(evaluation.get("source_only"))
    confounded = baseline is not None and baseline[0] >= CONFOUNDED_SOURCE_AUC
    found = [
        *_ablation(ablation or {}, lungs_mode),
        *_source_detector(evaluation),
        *_within_source(evaluation),
        *_seen_unseen(evaluation),
        *_probe(probe or {}, confounded),
        *_saliency(saliency or {}),
    ]
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found, key=lambda f: order[f["severity"]])


def verdict(findings: list[Mapping[str, Any]]) -> str:
    """The most severe severity among ``findings`` (``ok`` when there are none)."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return min((f["severity"] for f in findings), key=lambda s: order[s], default="ok")
