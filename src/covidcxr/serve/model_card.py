"""The model card ``GET /model`` serves: what the model was trained on and how far to trust it.

Built from the run directory alone, every part optional except the recipe:

* ``config.yaml`` / the checkpoint's recipe: task, classes, data (collection, sources,
  negatives, phantoms), model, preprocessing;
* ``manifest.parquet``: images and patients per split and source (the sources seen);
* ``metrics.json``: validation and test metrics at the run's threshold (training time);
* ``evaluation.json`` (``covidcxr evaluate``): per-source metrics with CIs, seen vs unseen
  sources and the DeLong test of the gap;
* ``audit/audit.json`` (``covidcxr audit``): the shortcut audit's ``verdict`` and ``findings``.

A missing part is reported as missing (``null`` and a line in ``notes``), never invented.

Example:
    >>> card = build_model_card(load_run("runs/demo"))                    # doctest: +SKIP
    >>> card["sources_seen"], card["audit"]["findings"][0]["severity"]    # doctest: +SKIP
    (['site_a', 'site_b', 'site_c'], 'shortcut')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from covidcxr import MEDICAL_USE_BANNER, __version__
from covidcxr.rundir import RunDir

if TYPE_CHECKING:
    from covidcxr.train.inference import LoadedRun

__all__ = ["NOT_FOR", "build_model_card", "human_card", "one_line_summary"]

_METRIC_KEYS = ("n", "n_patients", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "tp", "fp", "tn", "fn")


def _read_json(path: Path, notes: list[str], what: str) -> dict[str, Any] | None:
    if not path.is_file():
        notes.append(f"no {path.name}: {what} not available")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} is unreadable ({exc}); {what} not shown")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object; {what} not shown")
        return None
    return data


#: What no covidcxr model may be used for, whatever its numbers (shown on every card).
NOT_FOR = (
    "diagnosing, triaging or ruling out COVID-19 or pneumonia in a patient: it is a research tool, not a medical device",
    "any decision about a patient's care, isolation or testing",
    "images unlike its training data (other hospitals, devices, lateral or paediatric views) without a new evaluation there",
)


def _trained_on(frame: pd.DataFrame) -> dict[str, dict[str, int | None]]:
    """Images and patients per source of the train + validation splits (what the model was fitted on)."""
    fitted = frame[frame["split"].isin(["train", "val"])] if "split" in frame else frame
    out: dict[str, dict[str, int | None]] = {}
    for source, part in fitted.groupby("source", sort=True):
        out[str(source)] = {"images": int(len(part)), "patients": int(part["patient_id"].nunique()) if "patient_id" in part else None}
    return out


def _split_counts(run_dir: Path, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    path = RunDir(run_dir).manifest
    if not path.is_file():
        notes.append("no manifest.parquet: images per split and source unknown")
        return {}, {}
    frame = pd.read_parquet(path, columns=None)
    counts: dict[str, Any] = {}
    for split, part in frame.groupby("split", sort=True):
        counts[str(split)] = {
            "images": int(len(part)),
            "patients": int(part["patient_id"].nunique()) if "patient_id" in part else None,
            "per_source": {str(s): int(n) for s, n in part["source"].value_counts().sort_index().items()},
        }
    return counts, _trained_on(frame)


def _metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        block = metrics.get(split)
        if isinstance(block, dict):
            out[split] = {k: block[k] for k in _METRIC_KEYS if k in block}
    for key in ("epochs_trained", "best_epoch", "monitor", "best_score", "status"):
        if key in metrics:
            out[key] = metrics[key]
    return out


def _estimate(metric: Any) -> Any:
    return metric.get("estimate") if isinstance(metric, dict) else metric


def _evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    if evaluation is None:
        return None

    def brief(block: Any) -> Any:
        if not isinstance(block, dict):
            return None
        out = {k: block.get(k) for k in ("n_images", "n_patients", "note")}
        for name in ("auc", "sensitivity", "specificity", "balanced_accuracy"):
            metric = block.get(name)
            if isinstance(metric, dict):
                out[name] = {k: metric.get(k) for k in ("estimate", "low", "high")}
        return out

    seen_unseen = evaluation.get("seen_unseen") or {}
    return {
        "split": evaluation.get("split"),
        "threshold": evaluation.get("threshold"),
        "training_sources": evaluation.get("training_sources"),
        "per_source": {str(k): brief(v) for k, v in (evaluation.get("per_source") or {}).items()},
        "seen": brief(seen_unseen.get("seen")),
        "unseen": brief(seen_unseen.get("unseen")),
        "seen_sources": seen_unseen.get("seen_sources"),
        "unseen_sources": seen_unseen.get("unseen_sources"),
        "gap": seen_unseen.get("gap"),
    }


def _audit(audit: dict[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    if audit is None:
        return None
    findings = audit.get("findings")
    if not isinstance(findings, list):
        notes.append("audit.json has no 'findings' list")
        return None
    kept = [{k: f.get(k) for k in ("id", "severity", "text", "value", "threshold")} for f in findings if isinstance(f, dict)]
    return {
        "verdict": audit.get("verdict"),
        "findings": kept,
        "shortcuts": sum(1 for f in kept if f.get("severity") == "shortcut"),
        "warnings": sum(1 for f in kept if f.get("severity") == "warning"),
    }


def build_model_card(run: LoadedRun, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card of a loaded run as a JSON-ready dict.

    Args:
        run: the loaded run.
        extra: more sections to include (the predictor adds the engine, the
            out-of-distribution rule and the warning rules).

    Returns:
        ``{"name", "banner", "task", "classes", "threshold", "model", "data", "sources_seen",
        "splits", "preprocess", "metrics", "evaluation", "audit", "provenance", "notes", ...}``.
    """
    notes: list[str] = []
    recipe = run.recipe
    data = recipe.data
    splits, trained_on = _split_counts(run.run_dir, notes)
    seen = sorted(trained_on)
    rd = RunDir(run.run_dir)
    metrics = _read_json(rd.metrics, notes, "training-time metrics")
    evaluation = _read_json(rd.evaluation, notes, "per-source and seen/unseen metrics (run `covidcxr evaluate RUN`)")
    audit = _read_json(rd.audit_file, notes, "shortcut audit findings (run `covidcxr audit RUN`)")
    point = run.operating_point or rd.operating_point()
    card: dict[str, Any] = {
        "name": run.name,
        "banner": MEDICAL_USE_BANNER,
        "task": data.task,
        "classes": list(run.classes),
        "threshold": run.threshold if run.binary else None,
        "operating_point": {
            **{k: v for k, v in point.to_dict().items() if k in ("threshold", "rule", "value", "chosen_on", "temperature", "validation")},
            "describe": point.describe(),
        },
        "run_warnings": rd.warnings(),
        "model": {
            "name": recipe.model.name,
            "weights": run.model_description,
            "input_size": list(run.input_size),
            "in_channels": recipe.model.in_channels,
            "pretrained": recipe.model.pretrained,
        },
        "data": {
            "collection": data.collection,
            "manifest": data.manifest,
            "synthetic": data.synthetic.model_dump(mode="json") if data.synthetic is not None else None,
            "sources": list(data.sources),
            "negatives_from": list(data.negatives_from),
            "split": data.split.model_dump(mode="json"),
        },
        "sources_seen": seen,
        "trained_on": trained_on,
        "splits": splits,
        "preprocess": run.preprocess_config.model_dump(mode="json"),
        "metrics": _metrics(metrics),
        "evaluation": _evaluation(evaluation),
        "audit": _audit(audit, notes),
        "provenance": {
            "checkpoint": run.model_description,
            "config_hash": run.info.get("config_hash"),
            "manifest_hash": run.info.get("manifest_hash"),
            "code_version": run.info.get("code_version"),
            "served_by": f"covidcxr {__version__}",
        },
        "notes": notes,
    }
    card.update(extra or {})
    card["summary"] = human_card(card)
    return card


def _interval(metric: Any, digits: int = 2) -> str | None:
    """``0.91 (95% CI 0.85–0.95)`` from ``{estimate, low, high}``; None without an estimate."""
    if not isinstance(metric, dict) or metric.get("estimate") is None:
        return None
    text = f"{metric['estimate']:.{digits}f}"
    if metric.get("low") is not None and metric.get("high") is not None:
        text += f" (95% CI {metric['low']:.{digits}f}–{metric['high']:.{digits}f})"
    return text


def _performance(evaluation: dict[str, Any] | None) -> list[str]:
    """A sentence per group (seen / unseen sources) of ``evaluation.json``: AUC, sensitivity, specificity, n."""
    if not evaluation:
        return ["not evaluated: run `covidcxr evaluate` on the run to measure it on seen and unseen sources"]
    lines = []
    for group in ("seen", "unseen"):
        block = evaluation.get(group)
        sources = evaluation.get(f"{group}_sources") or []
        if not isinstance(block, dict) or block.get("n_images") in (None, 0):
            lines.append(f"{group} sources: no test images" + (f" ({block.get('note')})" if isinstance(block, dict) and block.get("note") else ""))
            continue
        parts = [f"{name} {shown}" for name in ("auc", "sensitivity", "specificity") if (shown := _interval(block.get(name))) is not None]
        where = f" ({', '.join(map(str, sources))})" if sources else ""
        lines.append(
            f"{group} sources{where}: " + ("; ".join(parts) or "no metric")
            + f" — {block.get('n_images')} test images, {block.get('n_patients')} patients"
        )
    return lines


def _audit_sentence(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return "not audited for shortcuts or skill (run `covidcxr audit`): every prediction abstains until it is"
    verdict = audit.get("verdict")
    words = {
        "no_skill": "NO SKILL — its test AUC interval includes 0.5; every prediction abstains",
        "shortcut": f"SHORTCUT — {audit.get('shortcuts', 0)} finding(s) say it may read the image's source rather than the lungs; every prediction abstains",
        "warning": f"warning — {audit.get('warnings', 0)} finding(s) to read before trusting it",
        "ok": "ok — no shortcut found by the audit's checks",
    }
    return words.get(str(verdict), f"verdict {verdict!r}")


def human_card(card: dict[str, Any]) -> dict[str, Any]:
    """The model card in words, for people: what it was trained on, how well it did, what not to use it for.

    Args:
        card: the dict `build_model_card` builds (before ``summary`` is added).

    Returns:
        ``{"trained_on", "performance" (a sentence per seen / unseen group, with 95% intervals
        and n images / n patients), "audit", "operating_point", "not_for" (a list), "one_line"}``.

    Example:
        >>> human_card(card)["trained_on"]    # doctest: +SKIP
        'synthetic phantoms — demo only: 315 images of 212 patients from site_a, site_b (no real radiograph)'
    """
    data = card.get("data") or {}
    trained = card.get("trained_on") or {}
    images = sum(v["images"] for v in trained.values())
    patients = sum(v["patients"] or 0 for v in trained.values()) if all(v.get("patients") is not None for v in trained.values()) else None
    counts = f"{images} images" + (f" of {patients} patients" if patients is not None else "")
    if data.get("synthetic") is not None:
        trained_on = f"synthetic phantoms — demo only: {counts} from {', '.join(trained) or 'unknown sites'} (no real radiograph)"
    elif trained:
        per = "; ".join(f"{s}: {v['images']} images" + (f", {v['patients']} patients" if v.get("patients") is not None else "") for s, v in trained.items())
        trained_on = f"{counts} (train + validation) from {len(trained)} source(s) — {per}"
    else:
        trained_on = "unknown (the run has no manifest)"
    point = card.get("operating_point") or {}
    summary = {
        "trained_on": trained_on,
        "performance": _performance(card.get("evaluation")),
        "audit": _audit_sentence(card.get("audit")),
        "operating_point": point.get("describe") or "unknown",
        "not_for": list(NOT_FOR),
    }
    summary["one_line"] = one_line_summary(card, summary)
    return summary


def one_line_summary(card: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """One line for the CLI: name, model, what it was trained on, unseen AUC, audit verdict.

    Example:
        >>> one_line_summary(card)   # doctest: +SKIP
        'model demo (resnet18): synthetic phantoms — demo only ...; unseen AUC 0.71 (95% CI 0.60–0.81); audit: shortcut'
    """
    summary = summary or card.get("summary") or {}
    model = (card.get("model") or {}).get("name", "?")
    text = f"model {card.get('name')} ({model}, {card.get('task')}): trained on {summary.get('trained_on', 'unknown')}"
    evaluation = card.get("evaluation") or {}
    for group in ("seen", "unseen"):
        shown = _interval((evaluation.get(group) or {}).get("auc"))
        if shown:
            text += f"; {group}-source AUC {shown}"
    audit = card.get("audit")
    return text + f"; audit: {audit.get('verdict') if audit else 'never audited'}"
