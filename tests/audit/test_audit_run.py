"""The audit on phantoms: a planted corner marker is flagged; without it, no shortcut is flagged.

Both collections give every site the same label mix (COVID vs normal, 50/50), so the site
itself is no shortcut and the only difference between the two runs is the marker (strength
0.9 on COVID images of every site, 0.05 on the rest) burned in outside the lungs. The
settings are the audit benchmark's (`benchmarks/bench_audit.py`: small_cnn at 64 px,
equalisation off, findings at twice the default opacity so the model learns the disease in a
few epochs) with fewer images: the clean run's test AUC interval is checked to lie above 0.5
before its verdict means anything.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from covidcxr.audit.run import audit_run, read_audit
from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from covidcxr.train.recipe import recipe_from_mapping
from covidcxr.train.run import train_recipe
from generated_data import tiny_train_recipe

MARKER = {"kind": "marker", "label": "covid", "strength": 0.9, "false_rate": 0.05}
SAME_MIX = {"covid": 0.5, "normal": 0.5}
N_IMAGES = 240
EPOCHS = 12


def _train(root, name, shortcut, epochs):
    recipe = tiny_train_recipe(
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
    return train_recipe(recipe_from_mapping(recipe), progress=False).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    return {"on": _train(root, "marker-on", MARKER, epochs=EPOCHS), "off": _train(root, "marker-off", None, epochs=EPOCHS)}


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
    assert np.isfinite(report["saliency"]["overall"]["lung_area_median"])


def test_audit_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CovidCXRError, match="not a directory"):
        audit_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CovidCXRError, match="no checkpoints"):
        audit_run(tmp_path / "empty")
