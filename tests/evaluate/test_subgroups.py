"""Confounders beyond the source: subgroup metrics, metadata-only baseline, view dependence, label mix."""

import numpy as np
import pandas as pd
import pytest

from covidcxr.evaluate.subgroups import AGE_BANDS, age_band, confounders, label_mix, metadata_only_auc, subgroup_metrics, view_dependence


def _rows(n=200, seed=0, view_follows_label=0.0, score_follows_view=0.0):
    """Patients with 1 image each; ``view_follows_label``: P(AP) = 0.5 +/- that; score = label + view effect + noise."""
    rng = np.random.default_rng(seed)
    target = np.arange(n) % 2
    ap = rng.random(n) < 0.5 + view_follows_label * (2 * target - 1)
    score = 1 / (1 + np.exp(-(1.5 * (2 * target - 1) + score_follows_view * (2 * ap - 1) + rng.normal(size=n))))
    return pd.DataFrame({
        "patient_id": [f"p{i}" for i in range(n)],
        "source": "site_a",
        "target": target,
        "probability": score,
        "view": np.where(ap, "AP", "PA"),
        "sex": np.where(rng.random(n) < 0.5, "F", "M"),
        "age": rng.integers(5, 95, size=n).astype(float),
    })


def test_age_bands_cover_every_age_once():
    assert age_band([0, 17.9, 18, 39, 40, 64.5, 65, 120, None, "x"]).tolist() == ["<18", "<18", "18-39", "18-39", "40-64", "40-64", ">=65", ">=65", "unknown", "unknown"]
    assert [b[0] for b in AGE_BANDS] == ["<18", "18-39", "40-64", ">=65"]


def test_subgroup_metrics_carry_intervals_and_counts():
    rows = _rows()
    out = subgroup_metrics(rows, n_boot=100)
    assert set(out) == {"view", "sex", "age_band"}
    assert set(out["view"]) == {"AP", "PA"}
    assert sum(m["n_images"] for m in out["view"].values()) == len(rows)
    auc = out["sex"]["F"]["auc"]
    assert auc["low"] <= auc["estimate"] <= auc["high"]
    missing = subgroup_metrics(rows.drop(columns=["sex"]), n_boot=20)
    assert set(missing["sex"]) == {"unknown"}


def test_metadata_only_auc_finds_a_view_confounded_label_and_not_a_clean_one():
    confounded = metadata_only_auc(_rows(seed=1, view_follows_label=0.4), _rows(seed=2, view_follows_label=0.4), n_boot=100)
    assert confounded["low"] > 0.75 and "view" in confounded["features"]
    clean = metadata_only_auc(_rows(seed=1), _rows(seed=2), n_boot=100)
    assert clean["low"] < 0.5 < clean["high"] + 0.05
    assert "skipped" in metadata_only_auc(_rows().assign(view="PA", sex="F", age=None), _rows(), n_boot=10)


def test_view_dependence_within_a_label_is_oriented_by_training():
    train = _rows(seed=3, view_follows_label=0.4)
    shortcut = view_dependence(_rows(seed=4, score_follows_view=2.0), train, n_boot=100)
    assert shortcut["views"] == ["AP", "PA"] and shortcut["low"] > 0.7
    assert shortcut["label_view_association"]["low"] > 0.5
    none = view_dependence(_rows(seed=4), train, n_boot=100)
    assert abs(none["estimate"] - 0.5) < 0.12 and none["high"] < 0.7
    assert "skipped" in view_dependence(_rows().assign(view="PA"), train, n_boot=10)


def test_label_mix_differs_only_when_rates_differ():
    a = _rows(n=100, seed=5).assign(source="a")
    b = _rows(n=100, seed=6).assign(source="b")
    assert label_mix(pd.concat([a, b]))["differs"] is False
    skewed = pd.concat([a, b[b["target"] == 0]])
    mix = label_mix(skewed)
    assert mix["differs"] is True and mix["positive_rate"]["b"] == 0.0
    assert label_mix(a)["differs"] is None


def test_confounders_bundle():
    out = confounders(_rows(seed=7), _rows(seed=8), n_boot=20)
    assert set(out) == {"subgroups", "metadata_only", "view_dependence"}
    with pytest.raises(KeyError):
        confounders(_rows().drop(columns=["target"]), _rows(), n_boot=10)
