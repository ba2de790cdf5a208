"""The run directory: every path in ``RUN/``, its typed readers and writers, and three answers.

One module owns what a run directory holds (DESIGN.md, "Run directory"). Training writes
it; evaluate, audit, report, predict, serve, export and the experiment grid read it through
`RunDir`, and it answers the three questions they share:

* **which weights are the model** (`RunDir.weights`): ``checkpoints/best.ckpt`` (else
  ``last.ckpt``), or the snapshot ensemble when the run's metrics come from the average
  of its snapshots (Hall et al. 2020) — the model that is evaluated is the model that is
  deployed;
* **what the operating threshold is** (`RunDir.operating_point`): chosen on the
  validation split by the recipe's ``operating_point`` rule at the end of training and
  stored in ``operating_point.json`` with the rule, the validation sensitivity and
  specificity at it (with intervals) and the n images / n patients behind them. A run
  trained before operating points were stored has none: its threshold is **0.5 with
  rule ``legacy-0.5``**, and `OperatingPoint.describe` says so;
* **what the run saw** (`RunDir.seen`): the train and validation rows (sources,
  patients, near-duplicate groups, file hashes, paths), so an image linked to any of them
  is never called a test image elsewhere (`covidcxr.experiments.testsets`).

Layout::

    RUN/
      config.yaml          the validated recipe, every default filled in
      manifest.parquet     the exact records used, with split and fold columns
      checkpoints/         best.ckpt, last.ckpt, snapshot-<k>.ckpt
      operating_point.json threshold, the rule that chose it, validation sensitivity/specificity
      predictions.parquet  per image: run, split, source, patient_id, label, target, probability
      metrics.json         training metrics, the weights that are the model, run warnings
      evaluation.json      the run's own test evaluation (covidcxr evaluate)
      external/<name>/     an evaluation on another collection
      audit/               audit.json, figures, tables (covidcxr audit)
      inference/           reference.npz: the out-of-distribution reference (written at the end of training,
                           read by covidcxr predict/serve)
      export/              ONNX export (covidcxr export)
      report.html          covidcxr report
      excluded.csv         images the preprocessing rejected, with the reason
      train_log.csv        one row per epoch
      fold-<k>/            one run directory per fold of a k-fold run

Example:
    >>> run = RunDir("runs/demo")                                  # doctest: +SKIP
    >>> run.threshold, run.operating_point().rule                  # doctest: +SKIP
    (0.37, 'sensitivity')
    >>> run.weights().describe()                                   # doctest: +SKIP
    'snapshot ensemble of 3 (snapshot-0.ckpt, snapshot-1.ckpt, snapshot-2.ckpt)'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.io.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from covidcxr.train.recipe import TrainRecipe

__all__ = ["LEGACY_RULE", "ModelWeights", "OperatingPoint", "RunDir", "SeenData"]

#: the rule of a run trained before operating points were stored: 0.5, chosen by nobody.
LEGACY_RULE = "legacy-0.5"

_RULE_WORDS = {
    "fixed": "a fixed threshold",
    "youden": "Youden's J (sensitivity + specificity - 1) maximised",
    "sensitivity": "the highest threshold reaching the target sensitivity",
    "specificity": "the lowest threshold reaching the target specificity",
    "argmax": "the most probable class (multi-class: no threshold)",
    LEGACY_RULE: "not chosen on validation: the run predates stored operating points, so 0.5 is assumed",
}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (Path, np.ndarray)):
        return str(value) if isinstance(value, Path) else value.tolist()
    if hasattr(value, "item"):  # torch scalars, without importing torch here
        return value.item()
    return str(value)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """``None`` when absent; a `CovidCXRError` naming the file when it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CovidCXRError(f"{path}: the run's {what} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CovidCXRError(f"{path}: the run's {what} must be a JSON object, got {type(data).__name__}")
    return data


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CovidCXRError(f"{path}: missing (expected the run's {what}, written by `covidcxr train`)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is bad input
        raise CovidCXRError(f"{path}: unreadable parquet ({exc})") from None


# ---------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class OperatingPoint:
    """The run's decision threshold and how it was chosen (``operating_point.json``).

    Attributes:
        threshold: ``probability >= threshold`` is positive (binary runs); None for a
            multi-class run (argmax).
        rule: ``fixed``, ``youden``, ``sensitivity``, ``specificity``, ``argmax`` or
            ``legacy-0.5`` (no stored operating point).
        value: the rule's target (fixed threshold, sensitivity or specificity), if any.
        chosen_on: ``validation``, ``pooled validation of k folds`` or ``nothing``.
        temperature: the temperature dividing the logit before the sigmoid/softmax
            (fitted on validation), None when the probabilities are not calibrated.
        validation: the validation sensitivity and specificity at the threshold
            (``{estimate, low, high}``), ``n_images``, ``n_patients``, ``interval``.
        per_fold: a k-fold root's folds' own operating points.
    """

    threshold: float | None
    rule: str
    value: float | None = None
    chosen_on: str = "validation"
    temperature: float | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    per_fold: list[dict[str, Any]] | None = None

    @property
    def legacy(self) -> bool:
        """True when the run stored no operating point (0.5 is assumed, and said)."""
        return self.rule == LEGACY_RULE

    @classmethod
    def legacy_default(cls) -> OperatingPoint:
        return cls(threshold=0.5, rule=LEGACY_RULE, chosen_on="nothing")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rule_means"] = _RULE_WORDS.get(self.rule, self.rule)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "operating_point.json") -> OperatingPoint:
        """Read back `to_dict` (unknown keys ignored).

        Raises:
            CovidCXRError: no ``rule``, or a ``threshold`` that is not a number in [0, 1] / null.
        """
        rule = data.get("rule")
        if not isinstance(rule, str) or not rule:
            raise CovidCXRError(f"{where}: field 'rule' missing (expected one of {sorted(_RULE_WORDS)})")
        threshold = data.get("threshold")
        if threshold is not None:
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise CovidCXRError(f"{where}: field 'threshold' must be a number in [0, 1] or null, got {threshold!r}") from None
            if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
                raise CovidCXRError(f"{where}: field 'threshold' must be in [0, 1], got {threshold}")
        temperature = data.get("temperature")
        if temperature is not None and (not isinstance(temperature, (int, float)) or not temperature > 0):
            raise CovidCXRError(f"{where}: field 'temperature' must be a positive number or null, got {temperature!r}")
        return cls(
            threshold=threshold,
            rule=rule,
            value=data.get("value"),
            chosen_on=str(data.get("chosen_on", "validation")),
            temperature=None if temperature is None else float(temperature),
            validation=dict(data.get("validation") or {}),
            per_fold=data.get("per_fold"),
        )

    def describe(self) -> str:
        """One sentence: the threshold, its rule and its validation numbers."""
        if self.threshold is None:
            return "decision: the most probable class (multi-class run, no threshold)"
        if self.legacy:
            return f"threshold 0.5 (rule {LEGACY_RULE}: {_RULE_WORDS[LEGACY_RULE]})"
        if self.rule == "fixed":
            text = f"threshold {self.threshold:.4g} (fixed by the recipe, not chosen on data)"
        else:
            target = "" if self.value is None else f" {self.value:g}"
            text = f"threshold {self.threshold:.4g} ({_RULE_WORDS.get(self.rule, self.rule)}{target}, chosen on {self.chosen_on})"
        v = self.validation
        parts = []
        for name in ("sensitivity", "specificity"):
            m = v.get(name) or {}
            if m.get("estimate") is not None:
                ci = f" [{m['low']:.2f}, {m['high']:.2f}]" if m.get("low") is not None and m.get("high") is not None else ""
                parts.append(f"{name} {m['estimate']:.2f}{ci}")
        if parts:
            text += f"; on validation {', '.join(parts)} ({v.get('n_images')} images, {v.get('n_patients')} patients)"
        if self.temperature is not None:
            text += f"; probabilities calibrated by temperature {self.temperature:.3g}"
        return text


@dataclass(frozen=True)
class ModelWeights:
    """Which checkpoint files are "the model" of a run.

    Attributes:
        kind: ``checkpoint`` (one file) or ``snapshot_ensemble`` (the members' average).
        checkpoints: the files, in order.
    """

    kind: str
    checkpoints: tuple[Path, ...]

    @property
    def is_ensemble(self) -> bool:
        return self.kind == "snapshot_ensemble"

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.checkpoints)
        return f"snapshot ensemble of {len(self.checkpoints)} ({names})" if self.is_ensemble else names

    def fingerprint(self) -> str:
        """SHA-1 of the files (joined by ``+``): an export or cache made from other weights is stale."""
        from covidcxr.data.manifest import file_sha1

        return "+".join(file_sha1(p) for p in self.checkpoints)


@dataclass(frozen=True)
class SeenData:
    """What a run trained or validated on, for excluding linked images when it is tested elsewhere.

    Attributes:
        rows: the train and validation rows (``source``, ``patient_id``, ``dup_group``,
            ``sha1``, ``image``... whichever the manifests hold).
        sources: the sources among them (the run's *seen* sources).
        fingerprint_files: the runs' stored fingerprints of those images (`RunDir.seen_fingerprints`,
            where written), read by `covidcxr.evaluate.seen_prints.stored_fingerprints`.
    """

    rows: pd.DataFrame
    sources: list[str]
    fingerprint_files: tuple[Path, ...] = ()

    LINK_COLUMNS = ("patient_id", "dup_group", "sha1", "image")

    def links(self) -> dict[str, set[str]]:
        """Column -> the values seen (empty, NaN and None left out)."""
        return _links([self.rows])

    def linked(self, rows: pd.DataFrame) -> np.ndarray:
        """``(N,)`` bool: ``rows`` sharing a patient, near-duplicate group, file hash or path with what the run saw."""
        return linked_rows(rows, [self.rows])


def _links(frames: Sequence[pd.DataFrame]) -> dict[str, set[str]]:
    links: dict[str, set[str]] = {c: set() for c in SeenData.LINK_COLUMNS}
    for frame in frames:
        for column in links:
            if column in frame.columns:
                values = frame[column].dropna().astype(str)
                links[column].update(v for v in values if v and v.lower() not in ("nan", "none", "<na>"))
    return links


def linked_rows(rows: pd.DataFrame, used: Sequence[pd.DataFrame]) -> np.ndarray:
    """``(N,)`` bool: rows sharing a patient, near-duplicate group, file hash or path with any ``used`` frame."""
    mask = np.zeros(len(rows), dtype=bool)
    for column, values in _links(used).items():
        if column in rows.columns and values:
            mask |= rows[column].astype(str).isin(values).to_numpy() & rows[column].notna().to_numpy()
    return mask


# ---------------------------------------------------------------------------------- the directory


class RunDir:
    """Every path of a run directory, its readers and writers, and its three answers.

    Args:
        path: the run directory (for a k-fold run: the root, or one ``fold-k``).

    Example:
        >>> run = RunDir("runs/demo")                       # doctest: +SKIP
        >>> frame = run.read_predictions()                  # doctest: +SKIP
        >>> run.threshold                                   # doctest: +SKIP
        0.5
    """

    CONFIG = "config.yaml"
    MANIFEST = "manifest.parquet"
    CHECKPOINTS = "checkpoints"
    OPERATING_POINT = "operating_point.json"
    PREDICTIONS = "predictions.parquet"
    METRICS = "metrics.json"
    EVALUATION = "evaluation.json"
    EXTERNAL = "external"
    AUDIT = "audit"
    AUDIT_FILE = "audit.json"
    INFERENCE = "inference"
    REFERENCE = "reference.npz"
    SEEN_FINGERPRINTS = "seen_fingerprints.npz"
    EXPORT = "export"
    REPORT = "report.html"
    EXCLUDED = "excluded.csv"
    TRAIN_LOG = "train_log.csv"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def snapshot_checkpoint(self, k: int) -> Path:
        return self.checkpoints / f"snapshot-{k}.ckpt"

    def snapshot_checkpoints(self) -> list[Path]:
        """``checkpoints/snapshot-<k>.ckpt`` in the order of ``k``."""
        return sorted(self.checkpoints.glob("snapshot-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))

    @property
    def operating_point_file(self) -> Path:
        return self.path / self.OPERATING_POINT

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def evaluation(self) -> Path:
        return self.path / self.EVALUATION

    def external(self, name: str) -> Path:
        """``external/<name>/``: an evaluation of the run on another collection."""
        if not name or "/" in name or name in (".", ".."):
            raise CovidCXRError(f"external evaluation name {name!r}: expected a plain folder name")
        return self.path / self.EXTERNAL / name

    @property
    def audit_dir(self) -> Path:
        return self.path / self.AUDIT

    @property
    def audit_file(self) -> Path:
        return self.audit_dir / self.AUDIT_FILE

    @property
    def inference_dir(self) -> Path:
        return self.path / self.INFERENCE

    @property
    def reference(self) -> Path:
        """The out-of-distribution reference (`covidcxr.serve.reference`), built at the end of training."""
        return self.inference_dir / self.REFERENCE

    @property
    def seen_fingerprints(self) -> Path:
        """Fingerprints of the train/val images (`covidcxr.evaluate.seen_prints`), written at the end of training.

        With them, ``evaluate --data`` finds near-duplicates of what the run saw even where its
        training images cannot be read (a shipped model, a run moved to another machine).
        """
        return self.inference_dir / self.SEEN_FINGERPRINTS

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    @property
    def excluded(self) -> Path:
        return self.path / self.EXCLUDED

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    def fold(self, k: int) -> RunDir:
        return RunDir(self.path / f"fold-{k}")

    def folds(self) -> list[RunDir]:
        """A k-fold root's ``fold-<k>`` directories, in the order of ``k`` (empty otherwise)."""
        found = [p for p in self.path.glob("fold-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
        return [RunDir(p) for p in sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))]

    @property
    def is_kfold_root(self) -> bool:
        return not self.checkpoints.is_dir() and bool(self.folds())

    # ------------------------------------------------------------------ readers
    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as a mapping ({} when absent).

        Raises:
            CovidCXRError: not valid YAML, or not a mapping.
        """
        import yaml

        if not self.config.is_file():
            return {}
        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CovidCXRError(f"{self.config}: not valid YAML ({exc})") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise CovidCXRError(f"{self.config}: expected a mapping of recipe sections, got {type(data).__name__}")
        return data

    def read_recipe(self) -> TrainRecipe:
        """``config.yaml`` validated as a `TrainRecipe`.

        Raises:
            CovidCXRError: no config.yaml, or one that is not a valid recipe.
        """
        from covidcxr.train.recipe import recipe_from_mapping

        if not self.config.is_file():
            raise CovidCXRError(f"{self.config}: missing (expected a run directory written by `covidcxr train`)")
        return recipe_from_mapping(self.read_config(), origin=str(self.config))

    @property
    def name(self) -> str:
        """The recipe's ``name``, else the folder's name."""
        name = self.read_config().get("name")
        return str(name) if name else self.path.resolve().name

    def read_manifest(self) -> pd.DataFrame:
        """``manifest.parquet`` (a k-fold root: every fold's, with ``fold_dir``)."""
        if not self.manifest.is_file() and self.is_kfold_root:
            frames = [f.read_manifest().assign(fold_dir=f.path.name) for f in self.folds() if f.manifest.is_file()]
            if frames:
                return pd.concat(frames, ignore_index=True)
        return _read_parquet(self.manifest, "records with their split")

    def read_predictions(self) -> pd.DataFrame:
        return _read_parquet(self.predictions, "per-image predictions")

    def read_metrics(self) -> dict[str, Any] | None:
        return _read_json(self.metrics, "training metrics")

    def read_evaluation(self) -> dict[str, Any] | None:
        return _read_json(self.evaluation, "test evaluation")

    def read_audit(self) -> dict[str, Any] | None:
        return _read_json(self.audit_file, "shortcut audit")

    def read_excluded(self) -> pd.DataFrame | None:
        if not self.excluded.is_file():
            return None
        try:
            return pd.read_csv(self.excluded)
        except Exception as exc:  # noqa: BLE001 - pandas' parser errors
            raise CovidCXRError(f"{self.excluded}: unreadable CSV ({exc})") from None

    # ------------------------------------------------------------------ writers (training)
    def write_config(self, recipe: TrainRecipe) -> None:
        atomic_write_text(self.config, recipe.to_yaml())

    def write_manifest(self, records: pd.DataFrame) -> None:
        with atomic_path(self.manifest) as tmp:
            records.to_parquet(tmp, index=False)

    def write_predictions(self, predictions: pd.DataFrame) -> None:
        with atomic_path(self.predictions) as tmp:
            predictions.to_parquet(tmp, index=False)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        _write_json(self.metrics, metrics)

    def write_operating_point(self, point: OperatingPoint) -> None:
        _write_json(self.operating_point_file, point.to_dict())

    def write_excluded(self, table: pd.DataFrame) -> None:
        with atomic_path(self.excluded) as tmp:
            table.to_csv(tmp, index=False)

    def write_evaluation(self, evaluation: Mapping[str, Any]) -> None:
        """``evaluation.json`` (`covidcxr.evaluate.cross_source.evaluate_run` writes it)."""
        atomic_write_text(self.evaluation, json.dumps(evaluation, indent=2, allow_nan=False) + "\n")

    # ------------------------------------------------------------------ answers
    def operating_point(self) -> OperatingPoint:
        """The stored operating point; a run without one gets 0.5 with rule ``legacy-0.5``.

        Raises:
            CovidCXRError: ``operating_point.json`` exists but is unreadable or malformed.
        """
        data = _read_json(self.operating_point_file, "operating point")
        if data is None:
            return OperatingPoint.legacy_default()
        return OperatingPoint.from_dict(data, str(self.operating_point_file))

    @property
    def threshold(self) -> float:
        """The decision threshold every stage uses (0.5 for a run without a stored one, or a multi-class run)."""
        point = self.operating_point()
        return 0.5 if point.threshold is None else float(point.threshold)

    def weights(self) -> ModelWeights:
        """The checkpoint(s) that are the run's model.

        ``metrics.json`` names them (``weights``); a run written before that field: the
        snapshot ensemble when its metrics came from it (``snapshots.ensemble``), else
        ``best.ckpt``, else ``last.ckpt``.

        Raises:
            CovidCXRError: a k-fold root (name a fold), or no checkpoint to load.
        """
        if self.is_kfold_root:
            names = [f.path.name for f in self.folds()]
            raise CovidCXRError(f"run {self.path} is a k-fold run: each fold has its own model; name one of {names}")
        metrics = self.read_metrics() or {}
        stated = metrics.get("weights")
        if isinstance(stated, Mapping) and stated.get("checkpoints"):
            files = tuple(self.checkpoints / str(n) for n in stated["checkpoints"])
            missing = [p for p in files if not p.is_file()]
            if missing:
                raise CovidCXRError(f"run {self.path}: metrics.json names {missing[0].name} as (part of) the model, but {missing[0]} is missing")
            return ModelWeights(str(stated.get("kind", "checkpoint")), files)
        snapshots = self.snapshot_checkpoints()
        if snapshots and isinstance(metrics.get("snapshots"), Mapping) and metrics["snapshots"].get("ensemble"):
            return ModelWeights("snapshot_ensemble", tuple(snapshots))
        for path in (self.best_checkpoint, self.last_checkpoint):
            if path.is_file():
                return ModelWeights("checkpoint", (path,))
        raise CovidCXRError(f"run {self.path} has no checkpoints/best.ckpt or last.ckpt (expected a finished `covidcxr train` run)")

    def seen(self, also: Sequence[RunDir | str | Path] = ()) -> SeenData:
        """The rows the run trained or validated on (a k-fold root: every fold's), plus ``also``'s (e.g. its stage-1 run).

        Raises:
            CovidCXRError: no manifest.parquet (or one without a ``split`` column).
        """
        frames = []
        runs = (self, *[r if isinstance(r, RunDir) else RunDir(r) for r in also])
        for run in runs:
            manifest = run.read_manifest()
            if "split" not in manifest.columns:
                raise CovidCXRError(f"{run.manifest}: no 'split' column (expected the records of a `covidcxr train` run)")
            frames.append(manifest[manifest["split"].isin(["train", "val"])])
        rows = pd.concat(frames, ignore_index=True)
        # every train/val row links (even one the preprocessing rejected: excluding its
        # patient elsewhere is the safe side); the seen sources are those actually used
        mine = frames[0]
        if "rejected_reason" in mine.columns:
            mine = mine[mine["rejected_reason"].isna()]
        sources = sorted(mine["source"].astype(str).unique().tolist()) if "source" in mine.columns else []
        prints = tuple(run.seen_fingerprints for run in runs if run.seen_fingerprints.is_file())
        return SeenData(rows=rows, sources=sources, fingerprint_files=prints)

    def seen_sources(self) -> list[str]:
        """Sources of the train/val rows; without a manifest, ``data.sources`` + ``data.negatives_from`` of config.yaml.

        Raises:
            CovidCXRError: neither names any source.
        """
        has_manifest = self.manifest.is_file() or any(f.manifest.is_file() for f in self.folds())
        if has_manifest:
            try:
                sources = self.seen().sources
            except CovidCXRError:
                sources = []
            if sources:
                return sources
        data = self.read_config().get("data") or {}
        found: set[str] = set()
        for key in ("sources", "negatives_from"):
            value = data.get(key) or []
            found.update([value] if isinstance(value, str) else [str(v) for v in value])
        if not found:
            raise CovidCXRError(
                f"{self.path}: cannot tell the training sources (expected manifest.parquet with split/source columns, "
                "or config.yaml with data.sources)"
            )
        return sorted(found)

    def warnings(self) -> list[dict[str, Any]]:
        """Warnings about the run itself, for the report's first screen (``metrics.json`` ``warnings``).

        Each is ``{"id", "severity", "text"}``; e.g. ``random_frozen_backbone``: the run froze
        backbone weights that were random (``model.allow_random_frozen: true``), so the
        frozen layers learned nothing. A k-fold root gathers its folds' (once per id).
        """
        found: dict[str, dict[str, Any]] = {}
        for run in (self, *self.folds()):
            metrics = run.read_metrics() or {}
            for item in metrics.get("warnings") or []:
                if isinstance(item, Mapping) and item.get("id"):
                    found.setdefault(str(item["id"]), dict(item))
        return list(found.values())
