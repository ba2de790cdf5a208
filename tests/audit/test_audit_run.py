"""The audit on phantoms: a planted corner marker and a learned intensity window are flagged; without them, no shortcut is flagged.

The collections give every site the same label mix (COVID vs normal, 50/50), so the site
itself is no shortcut and the only difference between the runs is the marker (strength
0.9 on COVID images of every site, 0.05 on the rest) burned in outside the lungs, or a
brighter, flatter window/level on the same images (the whole image, lungs included). The
window model is first shown to have learned the window (counterfactual phantoms with and
without it, beyond the clean model's shift on the same pairs) before its verdict is read. The
settings are the audit benchmark's (`benchmarks/bench_audit.py`: small_cnn at 64 px,
equalisation off, findings at twice the default opacity so the model learns the disease in a
few epochs) with fewer images: the clean run's test AUC interval is checked to lie above 0.5
before its verdict means anything.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.audit.run import audit_run, read_audit
from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from covidcxr.train.recipe import recipe_from_mapping
from covidcxr.train.run import train_recipe
from generated_data import tiny_train_recipe

MARKER = {"kind": "marker", "label": "covid", "strength": 0.9, "false_rate": 0.05}
WINDOW = {**MARKER, "kind": "window"}
SAME_MIX = {"covid": 0.5, "normal": 0.5}
N_IMAGES = 240
EPOCHS = 12


def _recipe(root, name, shortcut, epochs=EPOCHS):
    return tiny_train_recipe(
        root,
        name=name,
        data={
            "synthetic": {"n_images": N_IMAGES, "size": 64, "seed": 1, "shortcut": shortcut, "label_mix": SAME_MIX, "finding_scale": 2.0},
            "task": "covid_vs_rest",
            "split": {"test_size": 0.4, "val_size": 0.25},
        },
        preprocess={"cache_dir": str(root / "cache"), "size": 64, "mask_source": "manifest", "lungs": "none", "equalization": "none", "workers": 1},
        model={"name": "small_cnn", "arch_kwargs": {}},
        optimizer={"name": "adam", "lr": 0.002},
        augmentation={"rotation_degrees": 4, "translation": 0.03, "hflip": 0.0},
        train={"epochs": epochs, "batch_size": 16, "checkpoint_every_n_steps": 0},
    )


def _train(root, name, shortcut, epochs):
    return train_recipe(recipe_from_mapping(_recipe(root, name, shortcut, epochs)), progress=False).run_dir


def _window_shift_beyond_clean(root, planted_dir, clean_dir):
    """Mean score shift (95% t-interval) of test NORMAL images rendered with vs without the window, beyond the clean model's.

    The generator's plan does not depend on the shortcut, so a collection that windows every
    normal image holds the same phantoms, pixel-identical but for the window (a COVID image the
    model scores near 1 could not show a shift; a normal one can).
    """
    from scipy import stats

    from covidcxr.train.data import load_records
    from covidcxr.train.inference import cached_inputs, load_run

    manifest = pd.read_parquet(planted_dir / "manifest.parquet")
    plain = manifest[(manifest["split"] == "test") & (manifest["label"] == "normal") & ~manifest["shortcut"].astype(bool)].reset_index(drop=True)
    on_normals = recipe_from_mapping(_recipe(root, "window-on-normals", {**WINDOW, "label": "normal", "strength": 1.0, "false_rate": 0.0}))
    other, _ = load_records(on_normals)
    other = other.set_index(other["image"].map(lambda p: Path(p).name))
    keys = plain["image"].map(lambda p: Path(p).name)
    windowed = plain.copy()
    for column in ("image", "mask", "sha1", "shortcut"):
        windowed[column] = other.loc[keys, column].to_numpy()
    planted, clean = load_run(planted_dir), load_run(clean_dir)
    _, without, _, _ = cached_inputs(plain, planted.recipe)
    _, with_window, _, _ = cached_inputs(windowed, planted.recipe)
    assert np.abs(with_window - without).mean() > 0.01  # the counterfactual differs (by the window only)
    shift = (planted.predict(with_window) - planted.predict(without)) - (clean.predict(with_window) - clean.predict(without))
    half = stats.t.ppf(0.975, len(shift) - 1) * shift.std(ddof=1) / np.sqrt(len(shift))
    return float(shift.mean()), float(shift.mean() - half), len(shift)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    trained = {"on": _train(root, "marker-on", MARKER, epochs=EPOCHS), "off": _train(root, "marker-off", None, epochs=EPOCHS)}
    return {**trained, "window": _train(root, "window-on", WINDOW, epochs=EPOCHS), "root": root}


def test_audit_flags_the_planted_marker(runs):
    # --fail-on turns the verdict into an exit status for CI gates
    result = CliRunner().invoke(app, ["audit", str(runs["on"]), "--n-boot", "200", "--no-progress", "--fail-on", "shortcut"])
    assert result.exit_code == 1, result.output
    assert "SHORTCUT" in result.output and "Subgroups" in result.output
    report = read_audit(runs["on"])
    assert report["evaluation"]["overall"]["auc"]["low"] > 0.5  # it learned (the marker, at least)
    assert report["verdict"] == "shortcut"
    outside = next(f for f in report["findings"] if f["id"] == "outside_lung_signal")
    assert outside["severity"] == "shortcut" and outside["value"] > 0.7
    assert report["findings"][0]["severity"] == "shortcut"  # most severe first
    # the figures and tables the report embeds
    for name in ("gallery.png", "embedding.png", "lung_focus.parquet", "embedding.parquet"):
        assert (runs["on"] / "audit" / name).stat().st_size > 0
    assert report["n_images"] > 0 and report["n_patients"] > 0
    assert set(report["confounders"]) == {"subgroups", "metadata_only", "view_dependence"}
    assert report["label_mix"]["differs"] is False


def test_audit_flags_a_learned_intensity_window(runs):
    # checked first: the model learned the window (its score follows it beyond what the clean model's does)
    shift, low, n = _window_shift_beyond_clean(runs["root"], runs["window"], runs["off"])
    assert low > 0.05, f"the window model did not learn the window (shift beyond clean {shift:.3f}, CI low {low:.3f}, n {n}): its verdict would prove nothing"
    report = audit_run(runs["window"], n_boot=200, write=False)
    assert report["evaluation"]["overall"]["auc"]["low"] > 0.5
    assert report["verdict"] == "shortcut"
    found = next(f for f in report["findings"] if f["id"] == "label_from_intensity")
    assert found["severity"] == "shortcut", found["text"]
    baseline = report["intensity_baseline"]["baseline"]
    assert baseline["low"] > 0.5 and baseline["estimate"] >= 0.70
    assert report["intensity_baseline"]["difference"]["low"] <= 0.0  # the model is not clearly better than the window alone
    assert f"{baseline['estimate']:.2f}" in found["text"]  # the sentence quotes its number


def test_audit_does_not_flag_a_shortcut_when_there_is_none(runs):
    report = audit_run(runs["off"], n_boot=200)
    skill = report["evaluation"]["overall"]["auc"]
    assert skill["low"] > 0.5, f"the clean model learned nothing (AUC {skill}): its verdict would prove nothing"
    severities = {f["id"]: f["severity"] for f in report["findings"]}
    assert "shortcut" not in severities.values(), report["findings"]
    assert report["verdict"] in ("warning", "ok")
    assert severities["skill"] == "ok"
    assert severities["saliency_outside_lungs"] in ("warning", "info")  # never ok
    assert json.loads((runs["off"] / "audit" / "audit.json").read_text())["verdict"] == report["verdict"]
    # sites differ in acquisition, so the source is readable from the embedding — context, not a risk, with equal label mixes
    assert report["source_probe"]["full"]["balanced_accuracy"]["estimate"] > report["source_probe"]["full"]["chance"]
    assert severities["source_probe_full"] in ("info", "ok")
    assert set(report["intensity"]["windows"]) == {"brighter_flatter", "darker_steeper"}  # equalisation off: the window test runs
    assert severities["label_from_intensity"] in ("ok", "info")  # the outside-lung intensities do not give the label away
    assert report["intensity_baseline"]["baseline"]["estimate"] < 0.70
    assert np.isfinite(report["saliency"]["overall"]["lung_area_median"])


def test_audit_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CovidCXRError, match="not a directory"):
        audit_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CovidCXRError, match="no checkpoints"):
        audit_run(tmp_path / "empty")
