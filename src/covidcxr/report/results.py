"""Every number a report shows, collected from run directories into one JSON-ready dict.

The report is written in two steps so that the page and ``results.json`` can never
disagree: :func:`collect_results` reads the runs and computes every number (this
module), then :mod:`covidcxr.report.html` draws the page from that dict alone.

Inputs per run directory (see :mod:`covidcxr.train.run`; all optional except the
predictions)::

    RUN/predictions.parquet   split, source, patient_id, target, probability | prob_<class>
    RUN/config.yaml           the resolved recipe (shown verbatim, hashed)
    RUN/metrics.json          provenance: config/manifest hash, code version, classes
    RUN/manifest.parquet      the images used, with split  -> data composition
    RUN/excluded.csv          images the preprocessing rejected, with the reason
    RUN/evaluation.json       `covidcxr evaluate` (computed here, not written, when missing)
    RUN/audit/audit.json      `covidcxr audit` findings (+ its PNG figures)

Example::

    >>> from covidcxr.report.results import collect_results
    >>> results = collect_results(["runs/small_shared"])                 # doctest: +SKIP
    >>> results["runs"][0]["headline"]["auc"]["estimate"]               # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from covidcxr import MEDICAL_USE_BANNER, __version__
from covidcxr.errors import CovidCXRError
from covidcxr.audit import AUDIT_DIR
from covidcxr.audit.findings import SEVERITIES, derive_findings, verdict
from covidcxr.evaluate.cross_source import (
    EVALUATION_FILE,
    cross_source_matrix,
    cross_source_table,
    evaluate_run,
    json_ready,
)
from covidcxr.evaluate.calibration import apply_temperature, calibration_with_ci, fit_temperature, probabilities_to_logits
from covidcxr.evaluate.curves import precision_recall, sensitivity_at_specificity
from covidcxr.evaluate.metrics import (
    bootstrap_ci,
    roc_with_band,
    three_class_accuracy,
    two_class_accuracy,
)
from covidcxr.evaluate.stats import delong_test, mcnemar_test
from covidcxr.io.atomic import atomic_write_text
from covidcxr.report.palette import ROLE_COLORS, label_colors, source_colors
from covidcxr.rundir import RunDir

__all__ = [
    "REPORT_SCHEMA",
    "RunInputs",
    "collect_results",
    "collect_run",
    "data_composition",
    "ground_truth_outcome",
    "load_run_inputs",
    "multiclass_summary",
    "paired_comparisons",
    "run_operating_point",
    "write_results_json",
]

REPORT_SCHEMA = "covidcxr-report/1"
#: paired run comparisons need this many common test images
MIN_COMMON_IMAGES = 10
_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- inputs


@dataclass
class RunInputs:
    """What one run directory holds, read once (missing parts are None, with the reason).

    Attributes:
        run_dir: the run directory.
        name: the run's name (config ``name``, else the folder name).
        predictions: ``predictions.parquet`` (required).
        config_text: ``config.yaml`` verbatim (None when absent); config: parsed.
        metrics: ``metrics.json`` (empty dict when absent).
        manifest: ``manifest.parquet`` (k-fold: the fold manifests pooled), or None.
        excluded: ``excluded.csv``, or None.
        evaluation: ``evaluation.json`` or computed; evaluation_origin says which and why.
        audit: ``audit/audit.json``, or None; audit_problem says why it is unusable.
        notes: anything the report had to work around, in words.
        operating_point: the run's operating point (`covidcxr.rundir.OperatingPoint.to_dict`
            plus ``describe``, one sentence).
        run_warnings: warnings about the run itself (`covidcxr.rundir.RunDir.warnings`, e.g.
            ``random_frozen_backbone``: a hollow run), for the first screen.
    """

    run_dir: Path
    name: str
    predictions: pd.DataFrame
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: pd.DataFrame | None = None
    manifest_origin: str | None = None
    excluded: pd.DataFrame | None = None
    evaluation: dict[str, Any] | None = None
    evaluation_origin: str | None = None
    audit: dict[str, Any] | None = None
    audit_problem: str | None = None
    notes: list[str] = field(default_factory=list)
    operating_point: dict[str, Any] | None = None
    run_warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def audit_dir(self) -> Path:
        return self.run_dir / AUDIT_DIR

    @property
    def binary(self) -> bool:
        return "probability" in self.predictions.columns


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"{path}: expected a JSON object, got {type(data).__name__}"
    return data, None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is bad input, named
        raise CovidCXRError(f"{path}: unreadable parquet ({exc})") from None


def _evaluation_is_usable(evaluation: Mapping[str, Any], threshold: float | None) -> str | None:
    """Why a stored evaluation cannot be used (None: usable)."""
    wanted = ("per_source", "seen_unseen", "overall", "within_source", "source_only", "training_sources", "n_boot", "seed", "threshold")
    missing = [k for k in wanted if k not in evaluation]
    if missing:
        return f"evaluation.json lacks {', '.join(missing)} (written by an older `covidcxr evaluate`)"
    if threshold is not None and not math.isclose(float(evaluation["threshold"]), threshold):
        return f"evaluation.json used threshold {evaluation['threshold']}, the report was asked for {threshold}"
    return None


def load_run_inputs(
    run_dir: str | Path,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reevaluate: bool = False,
) -> RunInputs:
    """Read one run directory for a report.

    A stored ``evaluation.json`` is used when it is newer than ``predictions.parquet`` and
    has the requested threshold; otherwise the evaluation is computed with
    :func:`~covidcxr.evaluate.cross_source.evaluate_run` (not written: a report only reads).

    Args:
        run_dir: a run directory written by ``covidcxr train``.
        threshold: decision threshold (None: the run's operating point,
            `covidcxr.rundir.RunDir.threshold`; 0.5 for a run that stored none).
        n_boot: bootstrap resamples when the evaluation is computed here; seed: their seed.
        reevaluate: compute the evaluation even when ``evaluation.json`` is usable.

    Raises:
        CovidCXRError: not a run directory, no or unreadable ``predictions.parquet``,
            unreadable ``config.yaml``/``manifest.parquet``/``excluded.csv``.
    """
    rd = RunDir(run_dir)
    path = rd.path
    if not path.is_dir():
        raise CovidCXRError(f"{path}: not a run directory (expected a folder written by `covidcxr train`)")
    pred_path = rd.predictions
    if not pred_path.is_file():
        raise CovidCXRError(f"{path}: no predictions.parquet (expected a finished run of `covidcxr train`)")
    predictions = _read_parquet(pred_path)
    for column in ("split", "source", "patient_id", "target"):
        if column not in predictions.columns:
            raise CovidCXRError(f"{pred_path}: missing column '{column}' (expected the predictions of `covidcxr train`)")

    inputs = RunInputs(run_dir=path, name=path.resolve().name, predictions=predictions)
    inputs.operating_point = run_operating_point(path, threshold)
    inputs.run_warnings = rd.warnings()
    threshold = inputs.operating_point["threshold"] if threshold is None else threshold
    config_path = rd.config
    if config_path.is_file():
        import yaml

        inputs.config_text = config_path.read_text(encoding="utf-8")
        try:
            parsed = yaml.safe_load(inputs.config_text)
        except yaml.YAMLError as exc:
            raise CovidCXRError(f"{config_path}: not valid YAML ({exc})") from None
        inputs.config = parsed if isinstance(parsed, dict) else {}
        if inputs.config.get("name"):
            inputs.name = str(inputs.config["name"])
    else:
        inputs.notes.append("config.yaml is missing: the run's configuration cannot be shown")
    metrics, problem = _read_json(rd.metrics)
    inputs.metrics = metrics or {}
    if problem:
        inputs.notes.append(problem)

    if rd.manifest.is_file():
        inputs.manifest = _read_parquet(rd.manifest)
        inputs.manifest_origin = "manifest.parquet"
    else:
        folds = [f.manifest for f in rd.folds() if f.manifest.is_file()]
        if folds:
            # each image is tested in exactly one fold: the folds' test rows are every image once,
            # and the "split" column becomes the fold that tested it
            parts = []
            for fold_manifest in folds:
                frame = _read_parquet(fold_manifest)
                if "split" in frame.columns:
                    parts.append(frame[frame["split"] == "test"].assign(split=fold_manifest.parent.name))
            if parts:
                inputs.manifest = pd.concat(parts, ignore_index=True)
                inputs.manifest_origin = f"test rows of {len(parts)} fold manifests (k-fold run; columns are folds)"
        else:
            inputs.notes.append("manifest.parquet is missing: the data composition cannot be shown")
    inputs.excluded = rd.read_excluded()

    if inputs.binary:
        stored, problem = _read_json(rd.evaluation)
        why = None
        if stored is None:
            why = problem or f"{EVALUATION_FILE} is missing"
        elif reevaluate:
            why = "--reevaluate was given"
        elif rd.evaluation.stat().st_mtime < pred_path.stat().st_mtime:
            why = f"{EVALUATION_FILE} is older than predictions.parquet"
        else:
            why = _evaluation_is_usable(stored, inputs.operating_point["threshold"])
        if why is None:
            inputs.evaluation, inputs.evaluation_origin = stored, f"{EVALUATION_FILE} (written by `covidcxr evaluate`)"
        else:
            if (predictions["split"] == "test").any():
                try:
                    inputs.evaluation = evaluate_run(path, threshold=threshold, n_boot=n_boot, seed=seed, write=False)
                    inputs.evaluation_origin = f"computed by the report ({why}; n_boot={n_boot}, seed={seed})"
                except CovidCXRError as exc:  # e.g. no manifest or config naming the training sources
                    inputs.notes.append(f"the evaluation cannot be computed: {exc}")
            else:
                inputs.notes.append("predictions.parquet has no test rows: no evaluation")
        if inputs.evaluation is not None:
            inputs.evaluation["run"] = inputs.name

    audit_path = rd.audit_file
    inputs.audit, inputs.audit_problem = _read_json(audit_path)
    return inputs


# ----------------------------------------------------------------------------- helpers


def _rounded(values: Sequence[float], digits: int = 4) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else round(float(v), digits) for v in values]


# ----------------------------------------------------------------------------- operating point


def run_operating_point(run_dir: Path, threshold: float | None = None) -> dict[str, Any]:
    """The run's decision threshold and how it was chosen: the ONE place the report reads it.

    It is `covidcxr.rundir.RunDir.operating_point` (``RUN/operating_point.json``; rule
    ``legacy-0.5`` for a run that stored none), unless ``threshold`` overrides it (the
    report's ``--threshold``), which the page then says.

    Returns:
        `covidcxr.rundir.OperatingPoint.to_dict` plus ``describe`` (one sentence) — for a
        multi-class run ``threshold`` is None.
    """
    point = RunDir(run_dir).operating_point()
    out = {**point.to_dict(), "describe": point.describe()}
    if threshold is not None:
        out.update(threshold=float(threshold), rule="report-option", rule_means="given to the report (--threshold), not the run's own",
                   describe=f"threshold {float(threshold):.4g}, given to the report (--threshold) instead of the run's own ({point.describe()})")
    return out


# ----------------------------------------------------------------------------- curves


#: the range searched for a temperature (Guo et al. 2017 report 1-3 for modern networks)
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: specificities at which the report reads the sensitivity off the test ROC curve
FIXED_SPECIFICITIES = (0.90, 0.95)


def _test_groups(inputs: RunInputs, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Groups of test images: all, seen, unseen (when both exist) and every source, with their evaluation block."""
    test = inputs.predictions[inputs.predictions["split"] == "test"]
    seen = set(evaluation["training_sources"])
    su = evaluation.get("seen_unseen") or {}
    groups = [{"name": "all test images", "pooled": True, "seen": None, "rows": test, "block": evaluation.get("overall")}]
    if su.get("seen_sources") and su.get("unseen_sources"):
        is_seen = test["source"].astype(str).isin(seen)
        groups += [{"name": "seen sources", "pooled": True, "seen": True, "rows": test[is_seen], "block": su.get("seen")},
                   {"name": "unseen sources", "pooled": True, "seen": False, "rows": test[~is_seen], "block": su.get("unseen")}]
    per_source = evaluation.get("per_source") or {}
    for source in sorted(test["source"].astype(str).unique()):
        groups.append({"name": source, "pooled": False, "seen": source in seen,
                       "rows": test[test["source"].astype(str) == source], "block": per_source.get(source)})
    return groups


def _group_counts(group: Mapping[str, Any]) -> dict[str, Any]:
    rows = group["rows"]
    y = rows["target"].to_numpy().astype(np.int64)
    return {"name": group["name"], "pooled": group["pooled"], "seen": group["seen"],
            "n_images": int(len(rows)), "n_patients": int(rows["patient_id"].nunique()),
            "n_positive": int(y.sum()), "n_negative": int(y.size - y.sum())}


def _arrays(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rows["target"].to_numpy().astype(np.int64), rows["probability"].to_numpy().astype(np.float64), rows["patient_id"].astype(str).to_numpy()


def _point_of(block: Any, threshold: float) -> dict[str, Any] | None:
    """The operating point of one evaluation block: sensitivity, specificity (with CIs), FPR/TPR."""
    if not isinstance(block, Mapping):
        return None
    sens, spec = block.get("sensitivity"), block.get("specificity")
    if not isinstance(sens, Mapping) or not isinstance(spec, Mapping) or sens.get("estimate") is None or spec.get("estimate") is None:
        return None
    return {"threshold": threshold, "tpr": float(sens["estimate"]), "fpr": 1.0 - float(spec["estimate"]),
            "sensitivity": dict(sens), "specificity": dict(spec)}


def _roc_curves(inputs: RunInputs, evaluation: Mapping[str, Any], threshold: float) -> list[dict[str, Any]]:
    """ROC + band (+ the operating point) for the pooled test set, seen, unseen and every test source."""
    n_boot, seed = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0))
    curves = []
    for group in _test_groups(inputs, evaluation):
        entry = _group_counts(group)
        if entry["n_positive"] == 0 or entry["n_negative"] == 0:
            entry["note"] = "one class only: no ROC curve"
            entry["operating_point"] = _point_of(group["block"], threshold)
            curves.append(entry)
            continue
        y, s, patients = _arrays(group["rows"])
        roc = roc_with_band(y, s, patients, n_boot=n_boot, seed=seed)
        entry.update({
            "auc": float(roc_auc_score(y, s)),
            "auc_low": roc["auc_ci"]["low"], "auc_high": roc["auc_ci"]["high"],
            "fpr": _rounded(roc["fpr"]), "tpr": _rounded(roc["tpr"]),
            "band": {k: _rounded(v) for k, v in roc["band"].items()},
            "n_boot_valid": roc["n_boot_valid"], "note": None,
            "operating_point": _point_of(group["block"], threshold),
        })
        curves.append(entry)
    return curves


def _pr_curves(inputs: RunInputs, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Precision–recall curve, average precision [CI] and prevalence per group of :func:`_test_groups`."""
    n_boot, seed = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0))
    out = []
    for group in _test_groups(inputs, evaluation):
        entry = _group_counts(group)
        if entry["n_positive"] == 0 or entry["n_negative"] == 0:
            entry.update({"note": "one class only: no precision-recall curve", "prevalence": entry["n_positive"] / max(entry["n_images"], 1)})
            out.append(entry)
            continue
        pr = precision_recall(*_arrays(group["rows"]), n_boot=n_boot, seed=seed)
        entry.update({"precision": _rounded(pr["precision"]), "recall": _rounded(pr["recall"]),
                      "average_precision": pr["average_precision"], "prevalence": pr["prevalence"], "note": None})
        out.append(entry)
    return out


def _sensitivity_at_specificity(inputs: RunInputs, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Sensitivity at each of :data:`FIXED_SPECIFICITIES`, read off the pooled, seen and unseen test ROC curves."""
    n_boot, seed = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0))
    out = []
    for group in (g for g in _test_groups(inputs, evaluation) if g["pooled"]):
        counts = _group_counts(group)
        if counts["n_positive"] == 0 or counts["n_negative"] == 0:
            continue
        for target in FIXED_SPECIFICITIES:
            point = sensitivity_at_specificity(*_arrays(group["rows"]), specificity=target, n_boot=n_boot, seed=seed)
            out.append({**counts, **point})
    return out


def _calibration(inputs: RunInputs, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Brier score, ECE [patient-bootstrap CI] and the reliability curve of the pooled, seen and
    unseen test images; and, when the validation split holds both classes, the temperature
    fitted there (Guo et al. 2017) with the test ECE and Brier score after scaling."""
    n_boot, seed = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0))
    groups = []
    for group in (g for g in _test_groups(inputs, evaluation) if g["pooled"]):
        counts = _group_counts(group)
        if counts["n_images"] == 0:
            continue
        y, p, patients = _arrays(group["rows"])
        groups.append({**counts, **calibration_with_ci(y, p, patients, n_boot=n_boot, seed=seed)})
    out: dict[str, Any] = {"groups": groups, "binning": "10 equal-width bins of the predicted probability", "temperature": None}
    val = inputs.predictions[inputs.predictions["split"] == "val"]
    if len(val) >= 10 and val["target"].nunique() == 2 and groups:
        y_val, p_val, _ = _arrays(val)
        t = fit_temperature(probabilities_to_logits(p_val), y_val, bounds=TEMPERATURE_BOUNDS)
        base = {"fitted_on": "validation split", "n_val_images": int(len(val)), "n_val_patients": int(val["patient_id"].nunique()),
                "applied_to": "all test images"}
        if min(abs(t - b) / b for b in TEMPERATURE_BOUNDS) < 1e-3:
            # the NLL keeps falling towards a bound: the validation scores separate the classes
            # (or carry no signal), so no finite temperature is identified
            out["temperature"] = {**base, "temperature": None, "note": f"not identifiable: the fit ran to its bound {t:.3g} (validation scores separate the classes perfectly, or not at all)"}
        else:
            y, p, patients = _arrays(inputs.predictions[inputs.predictions["split"] == "test"])
            after = calibration_with_ci(y, apply_temperature(probabilities_to_logits(p), t), patients, n_boot=n_boot, seed=seed)
            out["temperature"] = {**base, "temperature": t, "note": None, "brier": after["brier"], "ece": after["ece"], "curve": after["curve"]}
    return out


# ----------------------------------------------------------------------------- composition


def data_composition(
    manifest: pd.DataFrame | None, excluded: pd.DataFrame | None = None, tested_elsewhere: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Source × label × split counts of images and patients, plus the excluded images.

    A run's manifest holds what it trained, validated and tested on; images of sources it
    never saw are scored afterwards (``covidcxr.demo.test_on_every_source``, the experiment
    grid) and appear only in ``predictions.parquet``. Pass those rows as ``tested_elsewhere``
    so the composition shows every source the report tests, unseen ones included.

    Args:
        manifest: a run's ``manifest.parquet`` (columns source, label, split, patient_id).
        excluded: a run's ``excluded.csv`` (image, split, source, reason), or None.
        tested_elsewhere: test rows that are not in the manifest (source, label,
            patient_id), counted in the ``test`` split.

    Returns:
        ``splits`` (ordered split names), ``rows`` = one per (source, label) with
        ``{split: {images, patients}}`` and ``total``; ``totals`` per split;
        ``classes`` = class_name × split image counts (when the manifest has class_name);
        ``excluded`` = ``{count, rows: [{source, split, reason, images}]}``; ``available``;
        ``tested_elsewhere`` = ``{images, sources}`` (rows added from the predictions) and
        ``tested_only_sources`` (sources present only there: never in training or validation).

    Example::

        >>> m = pd.DataFrame({"source": ["a", "a"], "label": ["covid", "normal"], "split": ["train", "test"], "patient_id": ["p1", "p2"]})
        >>> data_composition(m)["totals"]["train"]
        {'images': 1, 'patients': 1}
    """
    out: dict[str, Any] = {"available": manifest is not None, "splits": [], "rows": [], "totals": {}, "classes": [], "note": None,
                           "tested_elsewhere": {"images": 0, "sources": []}, "tested_only_sources": []}
    if manifest is not None and tested_elsewhere is not None and len(tested_elsewhere) and "source" in manifest.columns:
        extra = tested_elsewhere.assign(split="test")
        out["tested_elsewhere"] = {"images": int(len(extra)), "sources": sorted(extra["source"].astype(str).unique().tolist())}
        out["tested_only_sources"] = sorted(set(out["tested_elsewhere"]["sources"]) - set(manifest["source"].astype(str)))
        manifest = pd.concat([manifest, extra[[c for c in extra.columns if c in manifest.columns]]], ignore_index=True)
    if manifest is not None:
        missing = [c for c in ("source", "split", "patient_id") if c not in manifest.columns]
        if missing:
            out["available"] = False
            out["note"] = f"manifest lacks column(s) {', '.join(missing)}"
        else:
            if "label" in manifest.columns:
                labels = manifest["label"].fillna("unknown").astype(str)
            elif "class_name" in manifest.columns:
                labels = manifest["class_name"].fillna("unknown").astype(str)
                out["note"] = "the manifest has no label column: the model's classes are shown instead"
            else:
                labels = pd.Series("unknown", index=manifest.index)
                out["note"] = "the manifest has no label column"
            frame = manifest.assign(split=manifest["split"].fillna("none").astype(str), source=manifest["source"].astype(str), label=labels)
            splits = [s for s in _SPLITS if s in set(frame["split"])] + sorted(set(frame["split"]) - set(_SPLITS))
            out["splits"] = splits
            for (source, label), part in frame.groupby(["source", "label"], sort=True):
                row: dict[str, Any] = {"source": source, "label": label}
                for split in splits:
                    cell = part[part["split"] == split]
                    row[split] = {"images": int(len(cell)), "patients": int(cell["patient_id"].nunique())}
                row["total"] = {"images": int(len(part)), "patients": int(part["patient_id"].nunique())}
                out["rows"].append(row)
            for split in splits + ["total"]:
                cell = frame if split == "total" else frame[frame["split"] == split]
                out["totals"][split] = {"images": int(len(cell)), "patients": int(cell["patient_id"].nunique())}
            if "class_name" in frame.columns:
                for name, part in frame.groupby(frame["class_name"].astype(str), sort=True):
                    out["classes"].append({"class": name, **{s: int((part["split"] == s).sum()) for s in splits}, "total": int(len(part))})
    rows = []
    if excluded is not None and len(excluded):
        frame = excluded.copy()
        for column in ("source", "split", "reason"):
            frame[column] = frame[column].fillna("").astype(str) if column in frame.columns else ""
        for (source, split, reason), part in frame.groupby(["source", "split", "reason"], sort=True):
            rows.append({"source": source or "(adapter)", "split": split or "-", "reason": reason, "images": int(len(part))})
    out["excluded"] = {"count": int(0 if excluded is None else len(excluded)), "rows": rows, "file_present": excluded is not None}
    return out


# ----------------------------------------------------------------------------- findings


def _audit_section(inputs: RunInputs) -> dict[str, Any]:
    """The audit's content for the page: findings, probe, ablation, saliency, figure files."""
    audit_json = inputs.audit_dir / "audit.json"
    if inputs.audit is None:
        how = f"covidcxr audit {inputs.run_dir}"
        if inputs.audit_problem:
            return {"status": "unreadable", "problem": inputs.audit_problem, "command": how}
        return {"status": "not_audited", "problem": f"{audit_json} does not exist", "command": how}
    audit = inputs.audit
    findings = []
    for i, item in enumerate(audit.get("findings") or []):
        if not isinstance(item, Mapping):
            continue
        severity = str(item.get("severity", "info"))
        findings.append({
            "id": str(item.get("id", f"finding-{i}")),
            "severity": severity if severity in SEVERITIES or severity == "no_skill" else "info",
            "text": str(item.get("text", "")),
            "value": item.get("value"),
            "threshold": item.get("threshold"),
            "origin": "audit",
        })
    figures = []
    referenced = []
    saliency = audit.get("saliency") if isinstance(audit.get("saliency"), Mapping) else {}
    embedding = audit.get("embedding") if isinstance(audit.get("embedding"), Mapping) else {}
    if saliency.get("gallery"):
        referenced.append((str(saliency["gallery"]), "Grad-CAM saliency on test images, lung contours in white (saliency outside the lungs = the model looks elsewhere). "
                                                     "Each caption: source and true label, then the probability, the decision at the run's threshold and whether it is right (✓) or wrong (✗); saliency is weak evidence, in one direction only"))
    if embedding.get("figure"):
        method = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}.get(str(embedding.get("method", "")).lower(), str(embedding.get("method") or "2-D"))
        referenced.append((str(embedding["figure"]), f"{method} map of the model's image embeddings, coloured by source and by label (clusters by source rather than by label = the model encodes where an image comes from)"))
    names = {name for name, _ in referenced}
    if inputs.audit_dir.is_dir():
        referenced += [(p.name, p.stem.replace("_", " ")) for p in sorted(inputs.audit_dir.glob("*.png")) if p.name not in names]
    for name, caption in referenced:
        # only plain files inside RUN/audit/: a name from the JSON never reaches outside it
        path = inputs.audit_dir / name
        ok = Path(name).name == name and path.is_file()
        figures.append({"file": name, "caption": caption, "present": ok})
    return {
        "status": "audited",
        "file": str(audit_json),
        "verdict": audit.get("verdict"),
        "findings": findings,
        "n_images": audit.get("n_images"),
        "n_patients": audit.get("n_patients"),
        "split": audit.get("split"),
        "preprocess_lungs": audit.get("preprocess_lungs"),
        "source_probe": audit.get("source_probe") if isinstance(audit.get("source_probe"), Mapping) else None,
        "ablation": audit.get("ablation") if isinstance(audit.get("ablation"), Mapping) else None,
        "saliency": saliency or None,
        "embedding": embedding or None,
        "figures": figures,
    }


# ----------------------------------------------------------------------------- multi-class


def multiclass_summary(predictions: pd.DataFrame, classes: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Confusion matrix and accuracy (patient-bootstrap CI) of a multi-class run's test split.

    Args:
        predictions: rows with ``target`` (0..K-1) and ``prob_<class>`` columns.
        classes: class names in target order (default: from the ``prob_`` columns).

    Returns:
        ``classes``, ``confusion`` (K×K, rows true, columns predicted), ``accuracy``
        ``{estimate, low, high}``, ``two_class_accuracy`` (COVID vs the rest merged,
        Apostolopoulos & Mpesiana 2020; None without a covid class), ``three_class_accuracy``
        (3 classes only), ``recall``/``precision`` per class, ``per_source`` accuracy,
        ``n_images``, ``n_patients``, ``unsupported`` (what a multi-class run does not get).
    """
    columns = [c for c in predictions.columns if c.startswith("prob_")]
    names = list(classes) if classes and len(classes) == len(columns) else [c[len("prob_"):] for c in columns]
    test = predictions[predictions["split"] == "test"]
    out: dict[str, Any] = {
        "classes": names,
        "unsupported": (
            "AUC confidence intervals, ROC curves, the per-source diagnostic metrics and the seen-vs-unseen "
            "DeLong test are defined for binary runs; this run has several classes, so the page shows the "
            "confusion matrix and accuracy."
        ),
    }
    if len(test) == 0 or not columns:
        out["note"] = "no test predictions with prob_<class> columns"
        return out
    y = test["target"].to_numpy().astype(np.int64)
    pred = test[[f"prob_{n}" for n in names]].to_numpy().argmax(axis=1)
    k = len(names)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    correct = (pred == y).astype(np.int64)
    patients = test["patient_id"].astype(str).to_numpy()

    def acc(yy: np.ndarray, _ss: np.ndarray) -> float:
        return float(np.mean(yy))

    # bootstrap_ci resamples patients; the "labels" it sees are the per-image correctness
    ci = bootstrap_ci(correct, correct.astype(np.float64), patients, acc, n_boot=n_boot, seed=seed)
    out.update({
        "confusion": cm.tolist(),
        "accuracy": {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"]},
        "n_images": int(len(test)),
        "n_patients": int(ci["n_patients"]),
        "recall": {n: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, n in enumerate(names)},
        "precision": {n: (float(cm[i, i] / cm[:, i].sum()) if cm[:, i].sum() else None) for i, n in enumerate(names)},
        "three_class_accuracy": three_class_accuracy(confusion=cm) if k == 3 else None,
        "two_class_accuracy": two_class_accuracy(confusion=cm, covid_class=names.index("covid")) if "covid" in names else None,
        "per_source": [
            {"source": str(source), "n_images": int(len(part)), "n_patients": int(part["patient_id"].nunique()),
             "accuracy": float(np.mean(correct[test["source"].to_numpy() == source]))}
            for source, part in test.groupby("source", sort=True)
        ],
    })
    return out


# ----------------------------------------------------------------------------- one run, several runs


def _provenance(inputs: RunInputs) -> dict[str, Any]:
    m = inputs.metrics
    code = m.get("code_version") if isinstance(m.get("code_version"), Mapping) else {}
    return {
        "run_dir": str(inputs.run_dir.resolve()),
        "config_hash": m.get("config_hash"),
        "config_file_sha256": hashlib.sha256(inputs.config_text.encode("utf-8")).hexdigest() if inputs.config_text is not None else None,
        "manifest_hash": m.get("manifest_hash"),
        "split_ids": m.get("split_ids"),
        "code_version": code.get("covidcxr"),
        "git_commit": code.get("git_commit"),
        "git_dirty": code.get("git_dirty"),
        "model": m.get("model") or (inputs.config.get("model") or {}).get("name"),
        "task": m.get("task") or (inputs.config.get("data") or {}).get("task"),
        "classes": m.get("classes"),
        "epochs_trained": m.get("epochs_trained"),
        "best_epoch": m.get("best_epoch"),
        "status": m.get("status"),
        "evaluation": inputs.evaluation_origin,
        "composition": inputs.manifest_origin,
    }


def _headline(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    overall = evaluation.get("overall") or {}
    su = evaluation.get("seen_unseen") or {}
    return {
        "auc": overall.get("auc"),
        "sensitivity": overall.get("sensitivity"),
        "specificity": overall.get("specificity"),
        "balanced_accuracy": overall.get("balanced_accuracy"),
        "n_images": overall.get("n_images"),
        "n_patients": overall.get("n_patients"),
        "n_positive": overall.get("n_positive"),
        "n_negative": overall.get("n_negative"),
        "threshold": evaluation.get("threshold"),
        "auc_seen": (su.get("seen") or {}).get("auc"),
        "auc_unseen": (su.get("unseen") or {}).get("auc"),
        "gap": su.get("gap"),
        "within_source_auc": evaluation.get("within_source"),
        "source_only_auc": evaluation.get("source_only"),
    }


#: the banner's levels, most severe first (the audit's verdicts plus "not audited")
VERDICT_LEVELS = ("no_skill", "shortcut", "not_audited", "warning", "ok")


def _severity_rank(severity: str) -> int:
    order = ("no_skill", *[s for s in SEVERITIES if s != "no_skill"])
    return order.index(severity) if severity in order else len(order)


def _verdict(findings: Sequence[Mapping[str, Any]], audit: Mapping[str, Any], headline: Mapping[str, Any] | None) -> dict[str, Any]:
    """The page's one-line answer: no skill > shortcut > not audited > warning > ok.

    The audit's own verdict (``audit.json``'s ``verdict``) is used when the page knows it, so
    the banner and ``covidcxr audit`` never disagree; otherwise the audit's rule (the most
    severe finding). A ``no_skill`` finding (the skill gate: the AUC's interval includes 0.5)
    wins over everything, audited or not: nothing else means anything for such a model.
    """
    stored = audit.get("verdict") if audit.get("status") == "audited" else None
    level = stored if stored in VERDICT_LEVELS else verdict(list(findings))
    if any(f["severity"] == "no_skill" for f in findings):
        level = "no_skill"
    auc = (headline or {}).get("auc") or {}
    if auc.get("estimate") is not None:
        auc_text = f"pooled test AUC of {auc['estimate']:.3f}"
        if auc.get("low") is not None and auc.get("high") is not None:
            auc_text += f" (95% CI {auc['low']:.3f}–{auc['high']:.3f})"
    else:
        auc_text = "test performance"
    audit_level = level
    if level == "no_skill":
        gate = next((f["text"] for f in findings if f["severity"] == "no_skill"), None)
        title = f"No skill: {gate}" if gate else f"No skill: this model's {auc_text} is not distinguishable from chance."
        title += " Nothing else on this page is evidence that it works."
    elif level == "shortcut":
        title = f"Shortcut learning: this model's {auc_text} is not evidence it reads the lungs."
    elif audit["status"] != "audited":
        level = "not_audited"
        title = f"Not audited: nothing here shows whether this model's {auc_text} comes from the lungs or from a shortcut."
    elif level == "warning":
        title = f"No shortcut finding, but read the warnings before trusting the {auc_text}."
    else:
        level = "ok"
        title = f"The audit found no shortcut behind the {auc_text} (which does not make it a diagnostic test)."
    return {
        "level": level,
        "audit_verdict": audit_level,
        "title": title,
        "n_no_skill": sum(f["severity"] == "no_skill" for f in findings),
        "n_shortcut": sum(f["severity"] == "shortcut" for f in findings),
        "n_warning": sum(f["severity"] == "warning" for f in findings),
    }


def _tested_elsewhere(inputs: RunInputs) -> pd.DataFrame | None:
    """Test predictions of images that are not in the run's manifest (unseen sources scored
    after training, e.g. by ``covidcxr.demo.test_on_every_source``), as source/label/patient rows."""
    test = inputs.predictions[inputs.predictions["split"] == "test"]
    if inputs.manifest is None or test.empty or "source" not in inputs.manifest.columns:
        return None
    if "test_set" in test.columns:
        extra = test[test["test_set"].astype(str) == "unseen_source"]
    elif "image" in test.columns and "image" in inputs.manifest.columns:
        extra = test[~test["image"].astype(str).isin(set(inputs.manifest["image"].astype(str)))]
    else:
        extra = test[~test["source"].astype(str).isin(set(inputs.manifest["source"].astype(str)))]
    if extra.empty:
        return None
    if "label" in extra.columns:
        labels = extra["label"].astype(str)
    else:  # the run's classes when the predictions carry no label column
        classes = inputs.metrics.get("classes") if isinstance(inputs.metrics.get("classes"), list) else ["negative", "positive"]
        labels = extra["target"].astype(int).map(lambda t: str(classes[int(t)]) if int(t) < len(classes) else str(t))
    return pd.DataFrame({"source": extra["source"].astype(str).to_numpy(), "label": labels.to_numpy(),
                         "patient_id": extra["patient_id"].astype(str).to_numpy()})


def _embedding_points(inputs: RunInputs, audit: Mapping[str, Any]) -> dict[str, Any] | None:
    """The audit's t-SNE coordinates (``RUN/audit/embedding.parquet``), so the report draws the
    map with its own palette (one colour per source on every figure)."""
    embedding = audit.get("embedding") or {}
    name = str(embedding.get("table") or "")
    path = inputs.audit_dir / name
    if not name or Path(name).name != name or not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable table is noted, the audit's PNG is shown instead
        inputs.notes.append(f"{path}: unreadable ({exc}); the audit's own embedding figure is shown")
        return None
    if not {"x", "y", "source", "label"} <= set(table.columns):
        return None
    return {
        "method": str(embedding.get("method") or "tsne"),
        "x": _rounded(table["x"].astype(float).tolist(), 3),
        "y": _rounded(table["y"].astype(float).tolist(), 3),
        "source": table["source"].astype(str).tolist(),
        "label": table["label"].astype(str).tolist(),
        "split": table["split"].astype(str).tolist() if "split" in table.columns else None,
    }


def _diagnostics(inputs: RunInputs, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Operating point (with its test sensitivity/specificity), ROC, PR, sensitivity at fixed
    specificities and calibration of one binary run."""
    op = dict(inputs.operating_point or run_operating_point(inputs.run_dir))
    op["test"] = _point_of(evaluation.get("overall"), op["threshold"])
    overall = evaluation.get("overall") or {}
    op["n_images"], op["n_patients"] = overall.get("n_images"), overall.get("n_patients")
    return {
        "operating_point": op,
        "roc": _roc_curves(inputs, evaluation, op["threshold"]),
        "pr": _pr_curves(inputs, evaluation),
        "sensitivity_at_specificity": _sensitivity_at_specificity(inputs, evaluation),
        "calibration": _calibration(inputs, evaluation),
    }


def external_sections(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per ``RUN/external/<name>/`` (`covidcxr.evaluate.external`): the collection, per-source
    metrics with intervals, seen/unseen, what was excluded and why, and its audit's verdict and findings."""
    from covidcxr.evaluate.external import read_external

    sections = []
    for name, report in read_external(run_dir).items():
        audit = report.get("audit") or {}
        sections.append({
            "name": name,
            "data": report.get("data"),
            "training_sources": report.get("training_sources") or [],
            "per_source": report.get("per_source") or {},
            "seen_unseen": report.get("seen_unseen") or {},
            "overall": report.get("overall"),
            "threshold": report.get("threshold"),
            "excluded": report.get("excluded") or {},
            "rejected": {k: v for k, v in (report.get("rejected") or {}).items() if k != "adapter_refused"},
            "n_candidates": report.get("n_candidates"),
            "audit": {"verdict": audit.get("verdict"), "findings": [{**f, "origin": "audit"} for f in audit.get("findings") or []]} if audit else None,
        })
    return sections


def grid_unseen_results(run_dir: Path, db: str | Path | None = None) -> dict[str, Any] | None:
    """The experiment grid's per-source results of this run (unseen sources included), when it belongs to a grid.

    Looks for the grid's SQLite store (`covidcxr.experiments.store`) at ``db``, else
    ``experiments.sqlite`` in the run's parent folders (``runs/<grid>/<point>/`` ->
    ``runs/experiments.sqlite``, the default of ``covidcxr experiment run``). None when
    there is none or it does not know the run.
    """
    from covidcxr.experiments.store import RunStore, runs_table

    candidates = [Path(db)] if db is not None else [parent / "experiments.sqlite" for parent in Path(run_dir).resolve().parents[:3]]
    target = Path(run_dir).resolve()
    for file in candidates:
        if not file.is_file():
            continue
        store = RunStore(f"sqlite:///{file}")
        try:
            with store.engine.connect() as conn:
                rows = conn.execute(runs_table.select().with_only_columns(runs_table.c.id, runs_table.c.run_dir)).all()
            # the store keeps run_dir as the grid wrote it (often relative to where it ran)
            ids = [int(r.id) for r in rows if Path(r.run_dir).resolve() == target or (file.parent.parent / r.run_dir).resolve() == target]
            if not ids:
                continue
            metrics = store.metrics_frame(ids)
        finally:
            store.dispose()
        per_source = metrics[metrics["scope"] == "source"].sort_values("test_source")
        return {
            "store": str(file),
            "rows": [
                {"test_source": str(r.test_source), "seen": None if r.seen is None else bool(r.seen), "n_images": r.n_images, "n_patients": r.n_patients,
                 "auc": {"estimate": r.auc, "low": r.auc_low, "high": r.auc_high}, "note": r.note}
                for r in per_source.itertuples()
            ],
        }
    return None


def collect_run(inputs: RunInputs) -> dict[str, Any]:
    """Every number of one run's part of the report (see :func:`collect_results`)."""
    classes = inputs.metrics.get("classes")
    run: dict[str, Any] = {
        "name": inputs.name,
        "binary": inputs.binary,
        "positive_class": classes[1] if inputs.binary and isinstance(classes, list) and len(classes) == 2 else "positive",
        "provenance": _provenance(inputs),
        "config_text": inputs.config_text,
        "config": inputs.config,
        "composition": data_composition(inputs.manifest, inputs.excluded, _tested_elsewhere(inputs)),
        "audit": _audit_section(inputs),
        "external": external_sections(inputs.run_dir),
        "grid_unseen": grid_unseen_results(inputs.run_dir),
        "notes": list(inputs.notes),
        "operating_point": inputs.operating_point,
        "run_warnings": list(inputs.run_warnings),
        # flags shown on the first screen, inside the verdict box: {"id", "text"} each — the
        # run's own warnings (e.g. random_frozen_backbone: a hollow run trained by opt-in)
        "first_screen_flags": [{"id": str(w["id"]), "text": str(w.get("text", w["id"]))} for w in inputs.run_warnings],
        "evaluation": None,
        "headline": None,
        "operating_point": None,
        "roc": [],
        "pr": [],
        "sensitivity_at_specificity": [],
        "calibration": None,
        "multiclass": None,
    }
    if inputs.binary and inputs.evaluation is not None:
        evaluation = inputs.evaluation
        keys = ("training_sources", "overall", "per_source", "seen_unseen", "within_source", "source_only", "threshold", "n_boot", "seed")
        run["evaluation"] = {k: evaluation.get(k) for k in keys}
        run["headline"] = _headline(evaluation)
        run.update(_diagnostics(inputs, evaluation))
    elif not inputs.binary:
        run["multiclass"] = multiclass_summary(inputs.predictions, classes)
    if run["audit"]["status"] == "audited":
        findings = run["audit"]["findings"]
        run["audit"]["embedding_points"] = _embedding_points(inputs, run["audit"])
        run["notes"] = list(inputs.notes)
    elif run["evaluation"] is not None:
        # not audited: the audit's own rules on the evaluation's numbers alone (source-only
        # baseline, within-source AUC, seen vs unseen), so a confounded run is still flagged
        findings = [{**f, "origin": "evaluation"} for f in derive_findings(run["evaluation"], None, None, None)]
    else:
        findings = []
    findings = sorted(findings, key=lambda f: _severity_rank(f["severity"]))
    run["findings"] = findings
    run["verdict"] = _verdict(findings, run["audit"], run.get("headline"))
    return run


def paired_comparisons(runs: Sequence[RunInputs]) -> list[dict[str, Any]]:
    """Paired tests between binary runs scored on the same test images.

    Images are matched on the ``image`` column. DeLong's test for correlated AUCs
    (:func:`~covidcxr.evaluate.stats.delong_test`) compares the AUCs and McNemar's test
    (:func:`~covidcxr.evaluate.stats.mcnemar_test`) the paired decisions.

    Returns:
        One dict per pair with ``run_a, run_b, n_common`` and, when testable, ``delong``
        and ``mcnemar``; else ``note``.
    """
    out = []
    binary = [r for r in runs if r.binary and r.evaluation is not None]
    for i, a in enumerate(binary):
        for b in binary[i + 1:]:
            entry: dict[str, Any] = {"run_a": a.name, "run_b": b.name, "n_common": 0, "delong": None, "mcnemar": None,
                                     "accuracy_a": None, "accuracy_b": None, "note": None}
            if "image" not in a.predictions.columns or "image" not in b.predictions.columns:
                entry["note"] = "predictions.parquet without an image column: the images cannot be matched"
                out.append(entry)
                continue
            ta = a.predictions[a.predictions["split"] == "test"].drop_duplicates("image").set_index("image")
            tb = b.predictions[b.predictions["split"] == "test"].drop_duplicates("image").set_index("image")
            common = ta.index.intersection(tb.index)
            entry["n_common"] = int(len(common))
            if len(common) < MIN_COMMON_IMAGES:
                entry["note"] = f"{len(common)} common test images (at least {MIN_COMMON_IMAGES} needed for a paired test)"
                out.append(entry)
                continue
            y = ta.loc[common, "target"].to_numpy().astype(np.int64)
            if not np.array_equal(y, tb.loc[common, "target"].to_numpy().astype(np.int64)):
                entry["note"] = "the runs label the common images differently (different tasks): not compared"
                out.append(entry)
                continue
            sa, sb = ta.loc[common, "probability"].to_numpy(), tb.loc[common, "probability"].to_numpy()
            t_a = float(a.evaluation.get("threshold", 0.5))
            t_b = float(b.evaluation.get("threshold", 0.5))
            try:
                entry["delong"] = delong_test(y, sa, sb)
            except CovidCXRError as exc:  # e.g. fewer than two images of a class among the common ones
                entry["note"] = f"DeLong: {exc}"
            entry["mcnemar"] = mcnemar_test(y, (sa >= t_a).astype(np.int64), (sb >= t_b).astype(np.int64))
            entry["accuracy_a"] = float(np.mean((sa >= t_a) == y))
            entry["accuracy_b"] = float(np.mean((sb >= t_b) == y))
            out.append(entry)
    return out


def collect_results(
    run_dirs: Sequence[str | Path],
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reevaluate: bool = False,
    title: str | None = None,
    ground_truth: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of a report over one or more runs, JSON-ready.

    Args:
        run_dirs: run directories (``covidcxr train``).
        threshold, n_boot, seed, reevaluate: see :func:`load_run_inputs`.
        title: the page title (default: the run names).
        ground_truth: what is known to be in the data, e.g. the shortcut the demo planted
            (:func:`ground_truth_outcome`); the page states it and whether the audit found it.

    Returns:
        ``{schema, title, generated, covidcxr_version, medical_use, runs: [...],
        cross_source: {matrix, table} | None, comparisons: [...]}``; each run holds
        ``name, binary, verdict, findings, headline, evaluation, operating_point, roc, pr,
        sensitivity_at_specificity, calibration, audit, composition, multiclass, provenance,
        config, config_text, notes, first_screen_flags``; ``palette`` (the colour of every
        source and label on every figure) and ``ground_truth`` (None unless given).

    Raises:
        CovidCXRError: no runs, or a run directory that cannot be read (named).
    """
    if not run_dirs:
        raise CovidCXRError("report: give at least one run directory")
    inputs = [load_run_inputs(r, threshold=threshold, n_boot=n_boot, seed=seed, reevaluate=reevaluate) for r in run_dirs]
    runs = [collect_run(i) for i in inputs]
    evaluations = [i.evaluation for i in inputs if i.binary and i.evaluation is not None]
    cross = None
    if evaluations:
        matrix = cross_source_matrix(evaluations)
        table = cross_source_table(evaluations)
        cross = {
            "rows": [str(r) for r in matrix.index],
            "columns": [str(c) for c in matrix.columns],
            "auc": [[None if v != v else float(v) for v in row] for row in matrix.to_numpy().tolist()],
            "table": json.loads(table.to_json(orient="records")),
        }
    results = {
        "schema": REPORT_SCHEMA,
        "title": title or "covidcxr report: " + ", ".join(r["name"] for r in runs),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "covidcxr_version": __version__,
        "medical_use": MEDICAL_USE_BANNER,
        "runs": runs,
        "cross_source": cross,
        "comparisons": paired_comparisons(inputs),
        "palette": _palette(inputs, runs),
        "ground_truth": ground_truth_outcome(ground_truth, runs) if ground_truth else None,
        "figures": [],  # filled by covidcxr.report.html when the figure files are written
    }
    return _json_ready(results)


def _palette(inputs: Sequence[RunInputs], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Colours of every source and label the report shows, assigned once (see :mod:`covidcxr.report.palette`)."""
    sources: set[str] = set()
    labels: set[str] = set()
    for item, run in zip(inputs, runs):
        sources |= set(item.predictions["source"].astype(str))
        if item.manifest is not None and "source" in item.manifest.columns:
            sources |= set(item.manifest["source"].astype(str))
        sources |= {r["source"] for r in run["composition"]["rows"]}
        labels |= {r["label"] for r in run["composition"]["rows"]}
        points = (run.get("audit") or {}).get("embedding_points") or {}
        sources |= set(points.get("source") or [])
        labels |= set(points.get("label") or [])
    return {"sources": source_colors(sources), "labels": label_colors(labels), "roles": dict(ROLE_COLORS),
            "scheme": "labels and roles: Okabe-Ito; sources: Paul Tol's muted (both colour-blind safe)"}


def _mentions(finding: Mapping[str, Any], name: str) -> bool:
    named = finding.get("sources") or ([finding["source"]] if finding.get("source") else [])
    return name in [str(n) for n in named] or re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", str(finding.get("text", ""))) is not None


def _names(finding: Mapping[str, Any], site: str, sources: Sequence[str]) -> bool:
    """Does a finding single out ``site`` (its ``source``/``sources`` field or its text)?

    A finding that lists every tested source (e.g. "within a source (site_a, site_b, site_c)")
    names none of them in particular.
    """
    others = [s for s in sources if s != site]
    return _mentions(finding, site) and not (others and all(_mentions(finding, s) for s in others))


def ground_truth_outcome(truth: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """State a planted shortcut and whether each run's audit found it, from the audit's findings.

    *Found*: a ``shortcut`` finding names the site; *flagged*: only a ``warning`` names it, or
    the verdict is ``shortcut`` without naming it; *missed*: no finding names it; *not
    audited*: the run has no audit. Nothing is assumed: the outcome is read off the findings.

    Args:
        truth: ``{"description": "a marker was planted on COVID images of site_a", "site":
            "site_a", ...}`` (``covidcxr.demo.planted_shortcut``).
        runs: the report's runs.

    Returns:
        ``truth`` plus ``runs``: one ``{run, outcome, evidence: [finding ids], sentence}`` each.
    """
    site = str(truth.get("site") or "")
    description = str(truth.get("description") or "a shortcut was planted")
    out = {**dict(truth), "runs": []}
    for run in runs:
        audited = (run.get("audit") or {}).get("status") == "audited"
        findings = [f for f in run.get("findings") or [] if f.get("origin") == "audit"]
        sources = sorted({str(c["name"]) for c in run.get("roc") or [] if not c.get("pooled")})
        shortcut = [f["id"] for f in findings if f["severity"] == "shortcut" and site and _names(f, site, sources)]
        warning = [f["id"] for f in findings if f["severity"] == "warning" and site and _names(f, site, sources)]
        head = description[:1].upper() + description[1:]
        if not audited:
            outcome, sentence = "not_audited", f"{head}; this run was not audited, so nothing here says whether the audit finds it."
        elif shortcut:
            outcome, sentence = "found", f"{head}; the audit found it: {', '.join(shortcut)} names {site} as a shortcut."
        elif not site and run["verdict"]["level"] == "shortcut":
            shortcut = [f["id"] for f in findings if f["severity"] == "shortcut"]
            outcome, sentence = "found", f"{head}; the audit found a shortcut ({', '.join(shortcut)})."
        elif warning:
            outcome, sentence = "flagged", f"{head}; the audit did not call it a shortcut, but a warning names {site} ({', '.join(warning)})."
        elif run["verdict"]["level"] == "shortcut":
            shortcut = [f["id"] for f in findings if f["severity"] == "shortcut"]
            outcome, sentence = "flagged", f"{head}; the audit reports a shortcut ({', '.join(shortcut)}), but no finding singles out {site}."
        else:
            outcome, sentence = "missed", f"{head}; the audit did not find it: no finding singles out {site}."
        out["runs"].append({"run": run["name"], "outcome": outcome, "evidence": shortcut or warning, "sentence": sentence})
    if not site:
        out["note"] = "planted at every site: a shortcut verdict counts as found"
    return out


def _json_ready(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    return json_ready(value)


def write_results_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as JSON, atomically (NaN/inf as null); returns the path."""
    target = Path(path)
    atomic_write_text(target, json.dumps(_json_ready(results), indent=2, allow_nan=False, default=str) + "\n")
    return target
