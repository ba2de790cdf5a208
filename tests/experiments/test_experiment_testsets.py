"""Test-set rules: linked images are excluded, subsets keep each source's class balance, per-source metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.manifest import read_manifest
from covidcxr.experiments.testsets import linked_to, pooled_metrics, source_metrics, write_subset
from generated_data import make_tiny_manifest


def test_linked_to_matches_patient_duplicate_group_hash_and_path() -> None:
    rows = pd.DataFrame({
        "image": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "patient_id": ["x:1", "x:2", "x:3", "x:4", "x:5"],
        "dup_group": [None, "g7", None, None, None],
        "sha1": ["s1", "s2", "s3", "s4", None],
    })
    used = pd.DataFrame({"image": ["d.png"], "patient_id": ["x:1"], "dup_group": ["g7"], "sha1": ["s3"]})
    assert linked_to(rows, [used]).tolist() == [True, True, True, True, False]
    assert linked_to(rows, [used.iloc[:0]]).tolist() == [False] * 5
    # a missing value never links (None/NaN are not a shared group)
    assert not linked_to(pd.DataFrame({"image": ["z"], "patient_id": ["q"], "dup_group": [None], "sha1": [None]}), [pd.DataFrame({"dup_group": [None], "sha1": [np.nan]})]).any()


def test_subset_keeps_the_fraction_per_source_and_label_by_patient(tmp_path: Path) -> None:
    manifest = make_tiny_manifest(tmp_path / "col", {"big": {"covid": 40, "normal": 10}, "small": {"covid": 4, "pneumonia": 30}}, images_per_patient=2)
    collection = tmp_path / "col"
    manifest.assign(image=manifest["image"].map(lambda p: str(Path(p).relative_to(collection)))).to_csv(collection / "manifest.csv", index=False)
    subset = write_subset(collection, tmp_path / "subset.csv", fraction=0.25, min_images=10, seed=3)
    counts = subset.groupby(["source", "label"]).size().to_dict()
    # 25 % of 80 = 20; 25 % of 20 = 5 -> at least 10; 8 < 10 -> all; 25 % of 60 = 15 -> 16 (whole patients)
    assert counts == {("big", "covid"): 20, ("big", "normal"): 10, ("small", "covid"): 8, ("small", "pneumonia"): 16}
    per_patient = subset.groupby("patient_id").size()
    assert (per_patient == 2).all()  # patients are never split
    again = read_manifest(tmp_path / "subset.csv")
    assert sorted(again["image"]) == sorted(subset["image"])
    other = write_subset(collection, tmp_path / "other.csv", fraction=0.25, min_images=10, seed=4)
    assert sorted(other["image"]) != sorted(subset["image"])  # the seed draws the patients


def _scored(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for source, seen, separation, n in (("alpha", True, 3.0, 80), ("beta", False, 0.0, 80), ("gamma", False, 0.0, 30)):
        for i in range(n):
            positive = int(i % 2 == 0) if source != "gamma" else 0
            score = 1 / (1 + np.exp(-(rng.normal() + separation * (2 * positive - 1))))
            rows.append({"image": f"{source}{i}.png", "source": source, "patient_id": f"{source}:{i // 2}", "positive": positive, "target": 2 * positive,
                         "probability": score, "seen": seen, "probabilities": json.dumps([(1 - score) / 2, (1 - score) / 2, score])})
    return pd.DataFrame(rows)


def test_per_source_and_pooled_metrics() -> None:
    scored = _scored(np.random.default_rng(0))
    per_source = source_metrics(scored, n_boot=100, classes=["normal", "pneumonia", "covid"])
    assert set(per_source) == {"alpha", "beta", "gamma"}
    assert per_source["alpha"]["auc"]["estimate"] > 0.9 and per_source["alpha"]["seen"] is True
    assert 0.3 < per_source["beta"]["auc"]["estimate"] < 0.7 and per_source["beta"]["seen"] is False
    assert per_source["gamma"]["auc"] is None and "only negative" in per_source["gamma"]["note"]
    assert per_source["gamma"]["specificity"]["estimate"] == pytest.approx(float((scored.loc[scored.source == "gamma", "probability"] < 0.5).mean()))
    assert per_source["alpha"]["n_patients"] == 40 and per_source["alpha"]["n_images"] == 80
    multiclass = per_source["alpha"]["multiclass"]
    assert multiclass["classes"] == ["normal", "pneumonia", "covid"] and np.sum(multiclass["confusion"]) == 80
    pooled = pooled_metrics(scored, n_boot=100, classes=["normal", "pneumonia", "covid"])
    assert pooled["seen_sources"] == ["alpha"] and pooled["unseen_sources"] == ["beta", "gamma"]
    assert pooled["seen"]["n_images"] == 80 and pooled["unseen"]["n_images"] == 110
    assert pooled["gap"]["auc_diff"] > 0.3 and pooled["gap"]["p_value"] < 0.01
    gap = pooled["accuracy_gap"]
    assert sum(map(sum, gap["table"])) == len(scored) and gap["accuracy_seen"] > gap["accuracy_unseen"] and gap["p_value"] < 0.05
