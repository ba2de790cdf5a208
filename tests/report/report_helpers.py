"""Fake audits, multi-class runs and an HTML table reader for the report tests."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

SHORTCUT_TEXT = "With the lungs blanked out, the model still separates the classes within each source: AUC 0.91 [0.84, 0.97]."
WARNING_TEXT = "Grad-CAM puts a median 12% of its mass inside the lungs, which cover 25% of the input."


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A noisy RGB PNG (noise does not compress: a worst case for the page size)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _ci(estimate: float, half: float = 0.05) -> dict[str, float]:
    return {"estimate": estimate, "low": max(0.0, estimate - half), "high": min(1.0, estimate + half)}


def write_fake_audit(run_dir: Path, findings: list[dict[str, Any]] | None = None, gallery_size: tuple[int, int] = (300, 200), gallery_name: str = "gallery.png") -> dict[str, Any]:
    """``RUN/audit/audit.json`` following the audit schema, with a shortcut finding and two figures."""
    audit_dir = run_dir / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    if findings is None:
        findings = [
            {"id": "source_probe_lungs_blanked", "severity": "warning", "text": WARNING_TEXT, "value": 0.12, "threshold": 0.25},
            {"id": "outside_lung_signal", "severity": "shortcut", "text": SHORTCUT_TEXT, "value": 0.91, "threshold": 0.55},
            {"id": "lungs_only", "severity": "ok", "text": "Shown only its lungs, the model keeps AUC 0.90.", "value": 0.9, "threshold": 0.8},
        ]
    audit = {
        "run": "fake", "run_dir": str(run_dir), "split": "test", "n_images": 190, "n_patients": 95,
        "sources": ["alpha", "beta", "delta", "gamma"], "training_sources": ["alpha", "beta", "delta"],
        "preprocess_lungs": "none",
        "findings": findings,
        "source_probe": {
            "full": {"balanced_accuracy": _ci(0.97), "chance": 0.25, "n_images": 190, "n_sources": 4},
            "lungs_blanked": {"balanced_accuracy": _ci(0.93), "chance": 0.25, "n_images": 190, "n_sources": 4},
            "lungs_only": {"skipped": "no lung masks for this run"},
        },
        "ablation": {
            "original": {"auc": _ci(0.88), "n_images": 190, "n_patients": 95},
            "lungs_blanked": {"auc": _ci(0.86), "within_source_auc": _ci(0.91), "n_images": 190, "n_patients": 95},
            "lungs_only": {"auc": _ci(0.52), "n_images": 190, "n_patients": 95},
        },
        "saliency": {
            "per_group": [
                {"source": "alpha", "label": "covid", "n": 30, "lung_focus_median": 0.11, "lung_focus_q1": 0.05, "lung_focus_q3": 0.2, "lung_area_median": 0.25, "share_mostly_outside": 0.9},
                {"source": "gamma", "label": "normal", "n": 30, "lung_focus_median": 0.42, "lung_focus_q1": 0.3, "lung_focus_q3": 0.5, "lung_area_median": 0.26, "share_mostly_outside": 0.4},
            ],
            "overall": {"lung_focus_median": 0.12, "lung_area_median": 0.25, "n": 190},
            "gallery": gallery_name,
        },
        "embedding": {"method": "tsne", "figure": "embedding.png", "table": "embedding.parquet"},
    }
    (audit_dir / "audit.json").write_text(json.dumps(audit, indent=2))
    write_png(audit_dir / "gallery.png", *gallery_size, seed=1)
    write_png(audit_dir / "embedding.png", 240, 120, seed=2)
    return audit


def make_multiclass_run(run_dir: Path, seed: int = 0) -> pd.DataFrame:
    """A 3-class run (normal, pneumonia, covid): prob_<class> columns, no probability column."""
    rng = np.random.default_rng(seed)
    classes = ["normal", "pneumonia", "covid"]
    rows = []
    for split, n in (("val", 30), ("test", 90)):
        for i in range(n):
            target = i % 3
            logits = rng.normal(size=3)
            logits[target] += 1.5
            p = np.exp(logits) / np.exp(logits).sum()
            rows.append({"split": split, "source": ["alpha", "beta"][i % 2], "patient_id": f"{split}-p{i // 2}", "image": f"{split}/{i}.png",
                         "label": classes[target], "class_name": classes[target], "target": target,
                         **{f"prob_{c}": float(p[k]) for k, c in enumerate(classes)}})
    frame = pd.DataFrame(rows)
    frame["predicted"] = frame[[f"prob_{c}" for c in classes]].to_numpy().argmax(axis=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(run_dir / "predictions.parquet", index=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "three", "data": {"task": "three_class", "sources": ["alpha", "beta"]}}))
    (run_dir / "metrics.json").write_text(json.dumps({"run": "three", "task": "three_class", "classes": classes, "config_hash": "c" * 64}))
    return frame


class TableReader(HTMLParser):
    """Every <table> of a page as a list of rows of cell texts (whitespace collapsed)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._depth = 0
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
            self._depth += 1
        elif tag == "tr" and self._depth:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "table":
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data + " ")


def read_tables(html: str) -> list[list[list[str]]]:
    reader = TableReader()
    reader.feed(html)
    return reader.tables


def table_with_header(html: str, first_cells: list[str]) -> list[list[str]]:
    """The first table whose header row starts with ``first_cells``."""
    for table in read_tables(html):
        if table and table[0][: len(first_cells)] == first_cells:
            return table
    raise AssertionError(f"no table with header {first_cells}")
