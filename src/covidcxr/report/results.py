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
from covidcxr.evaluate.metrics import (
    bootstrap_ci,
    roc_with_band,
    three_class_accuracy,
    two_class_accuracy,
)
from covidcxr.evaluate.stats import delong_test, mcnemar_test
from covidcxr.io.atomic import atomic_write_text
from covidcxr.rundir import RunDir

__all__ = [
    "REPORT_SCHEMA",
    "RunInputs",
    "collect_results",
    "collect_run",
    "data_composition",
    "load_run_inputs",
    "multiclass_summary",
    "paired_comparisons",
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
    point = rd.operating_point()
    inputs.operating_point = {**point.to_dict(), "describe": point.describe()}
    inputs.run_warnings = rd.warnings()
    if threshold is None:
        threshold = rd.threshold
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
            why = _evaluation_is_usable(stored, threshold)
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


# ----------------------------------------------------------------------------- ROC with a band


def _rounded(values: Sequence[float], digits: int = 4) -> list[float | None]:
    return [None if v is None or not math.isfinite(v) else round(float(v), digits) for v in values]


def _roc_curves(inputs: RunInputs, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ROC + band for the pooled test set, seen, unseen and every two-class test source."""
    test = inputs.predictions[inputs.predictions["split"] == "test"]
    seen = set(evaluation["training_sources"])
    # (name, pooled over several sources?, seen by training? None for the mix)
    groups: list[tuple[str, bool, bool | None, pd.DataFrame]] = [("all test images", True, None, test)]
    su = evaluation.get("seen_unseen") or {}
    if su.get("seen_sources") and su.get("unseen_sources"):
        is_seen = test["source"].astype(str).isin(seen)
        groups += [("seen sources", True, True, test[is_seen]), ("unseen sources", True, False, test[~is_seen])]
    for source in sorted(test["source"].astype(str).unique()):
        groups.append((source, False, source in seen, test[test["source"].astype(str) == source]))
    n_boot, seed = int(evaluation.get("n_boot", 1000)), int(evaluation.get("seed", 0))
    curves = []
    for name, pooled, is_seen_group, rows in groups:
        y = rows["target"].to_numpy().astype(np.int64)
        entry: dict[str, Any] = {"name": name, "pooled": pooled, "seen": is_seen_group,
                                 "n_images": int(len(rows)), "n_patients": int(rows["patient_id"].nunique()),
                                 "n_positive": int(y.sum()), "n_negative": int(y.size - y.sum())}
        if y.size == 0 or y.min() == y.max():
            entry["note"] = "one class only: no ROC curve"
            curves.append(entry)
            continue
        roc = roc_with_band(y, rows["probability"].to_numpy(), rows["patient_id"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)
        entry.update({
            "auc": float(roc_auc_score(y, rows["probability"].to_numpy())),
            "auc_low": roc["auc_ci"]["low"], "auc_high": roc["auc_ci"]["high"],
            "fpr": _rounded(roc["fpr"]), "tpr": _rounded(roc["tpr"]),
            "band": {k: _rounded(v) for k, v in roc["band"].items()},
            "n_boot_valid": roc["n_boot_valid"], "note": None,
        })
        curves.append(entry)
    return curves


# ----------------------------------------------------------------------------- composition


def data_composition(manifest: pd.DataFrame | None, excluded: pd.DataFrame | None = None) -> dict[str, Any]:
    """Source × label × split counts of images and patients, plus the excluded images.

    Args:
        manifest: a run's ``manifest.parquet`` (columns source, label, split, patient_id).
        excluded: a run's ``excluded.csv`` (image, split, source, reason), or None.

    Returns:
        ``splits`` (ordered split names), ``rows`` = one per (source, label) with
        ``{split: {images, patients}}`` and ``total``; ``totals`` per split;
        ``classes`` = class_name × split image counts (when the manifest has class_name);
        ``excluded`` = ``{count, rows: [{source, split, reason, images}]}``; ``available``.

    Example::

        >>> m = pd.DataFrame({"source": ["a", "a"], "label": ["covid", "normal"], "split": ["train", "test"], "patient_id": ["p1", "p2"]})
        >>> data_composition(m)["totals"]["train"]
        {'images': 1, 'patients': 1}
    """
    out: dict[str, Any] = {"available": manifest is not None, "splits": [], "rows": [], "totals": {}, "classes": [], "note": None}
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
            "severity": severity if severity in SEVERITIES else "info",
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
        referenced.append((str(saliency["gallery"]), "Grad-CAM saliency on test images, lung contours drawn (saliency outside the lungs = the model looks elsewhere)"))
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


def _verdict(findings: Sequence[Mapping[str, Any]], audit: Mapping[str, Any], headline: Mapping[str, Any] | None) -> dict[str, Any]:
    """The page's one-line answer: shortcut > not audited > warning > ok."""
    level = verdict(list(findings))  # the audit's rule: the most severe finding
    auc = (headline or {}).get("auc") or {}
    if auc.get("estimate") is not None:
        auc_text = f"pooled test AUC of {auc['estimate']:.3f}"
        if auc.get("low") is not None and auc.get("high") is not None:
            auc_text += f" (95% CI {auc['low']:.3f}–{auc['high']:.3f})"
    else:
        auc_text = "test performance"
    if level == "shortcut":
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
        "title": title,
        "n_shortcut": sum(f["severity"] == "shortcut" for f in findings),
        "n_warning": sum(f["severity"] == "warning" for f in findings),
    }


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
        "composition": data_composition(inputs.manifest, inputs.excluded),
        "audit": _audit_section(inputs),
        "notes": list(inputs.notes),
        "operating_point": inputs.operating_point,
        "run_warnings": list(inputs.run_warnings),
        "evaluation": None,
        "headline": None,
        "roc": [],
        "multiclass": None,
    }
    if inputs.binary and inputs.evaluation is not None:
        evaluation = inputs.evaluation
        keys = ("training_sources", "overall", "per_source", "seen_unseen", "within_source", "source_only", "threshold", "n_boot", "seed")
        run["evaluation"] = {k: evaluation.get(k) for k in keys}
        run["headline"] = _headline(evaluation)
        run["roc"] = _roc_curves(inputs, evaluation)
    elif not inputs.binary:
        run["multiclass"] = multiclass_summary(inputs.predictions, classes)
    if run["audit"]["status"] == "audited":
        findings = run["audit"]["findings"]
    elif run["evaluation"] is not None:
        # not audited: the audit's own rules on the evaluation's numbers alone (source-only
        # baseline, within-source AUC, seen vs unseen), so a confounded run is still flagged
        findings = [{**f, "origin": "evaluation"} for f in derive_findings(run["evaluation"], None, None, None)]
    else:
        findings = []
    findings = sorted(findings, key=lambda f: SEVERITIES.index(f["severity"]))
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
) -> dict[str, Any]:
    """Every number of a report over one or more runs, JSON-ready.

    Args:
        run_dirs: run directories (``covidcxr train``).
        threshold, n_boot, seed, reevaluate: see :func:`load_run_inputs`.
        title: the page title (default: the run names).

    Returns:
        ``{schema, title, generated, covidcxr_version, medical_use, runs: [...],
        cross_source: {matrix, table} | None, comparisons: [...]}``; each run holds
        ``name, binary, verdict, findings, headline, evaluation, roc, pairs, audit,
        composition, multiclass, provenance, config, config_text, notes``.

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
    }
    return _json_ready(results)


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
