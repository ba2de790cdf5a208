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

__all__ = ["build_model_card"]

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


def _split_counts(run_dir: Path, notes: list[str]) -> tuple[dict[str, Any], list[str]]:
    path = RunDir(run_dir).manifest
    if not path.is_file():
        notes.append("no manifest.parquet: images per split and source unknown")
        return {}, []
    frame = pd.read_parquet(path, columns=None)
    counts: dict[str, Any] = {}
    for split, part in frame.groupby("split", sort=True):
        counts[str(split)] = {
            "images": int(len(part)),
            "patients": int(part["patient_id"].nunique()) if "patient_id" in part else None,
            "per_source": {str(s): int(n) for s, n in part["source"].value_counts().sort_index().items()},
        }
    fitted = frame[frame["split"].isin(["train", "val"])] if "split" in frame else frame
    return counts, sorted(str(s) for s in fitted["source"].dropna().unique())


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
    splits, seen = _split_counts(run.run_dir, notes)
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
    return card
