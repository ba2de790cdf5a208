"""The audit on phantoms: a planted corner marker is flagged; without it, no shortcut is flagged.

Both collections give every site the same label mix, so the site itself is no shortcut and
the only difference between the two runs is the marker (strength 0.9 on COVID images,
0.05 on the rest) burned in outside the lungs.
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
SAME_MIX = {"covid": 0.5, "normal": 0.25, "pneumonia": 0.25}


def _train(root, name, shortcut):
    recipe = tiny_train_recipe(
        root,
        name=name,
        data={
            "synthetic": {"n_images": 240, "size": 64, "seed": 1, "shortcut": shortcut, "label_mix": SAME_MIX},
            "task": "covid_vs_rest",
            "split": {"test_size": 0.4, "val_size": 0.25},
        },
        model={"name": "resnet18", "arch_kwargs": {}},
        train={"epochs": 4, "batch_size": 16, "checkpoint_every_n_steps": 0},
    )
    return train_recipe(recipe_from_mapping(recipe), progress=False).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    return {"on": _train(root, "marker-on", MARKER), "off": _train(root, "marker-off", None)}


def test_audit_flags_the_planted_marker(runs):
    # --fail-on turns the verdict into an exit status for CI gates
    result = CliRunner().invoke(app, ["audit", str(runs["on"]), "--n-boot", "200", "--no-progress", "--fail-on", "shortcut"])
    assert result.exit_code == 1, result.output
    assert "SHORTCUT" in result.output
    report = read_audit(runs["on"])
    assert report["verdict"] == "shortcut"
    outside = next(f for f in report["findings"] if f["id"] == "outside_lung_signal")
    assert outside["severity"] == "shortcut" and outside["value"] > 0.7
    assert report["findings"][0]["severity"] == "shortcut"  # most severe first
    # the figures and tables the report embeds
    for name in ("gallery.png", "embedding.png", "lung_focus.parquet", "embedding.parquet"):
        assert (runs["on"] / "audit" / name).stat().st_size > 0
    assert report["n_images"] > 0 and report["n_patients"] > 0
    blanked = report["ablation"]["lungs_blanked"]["within_source_auc"]
    assert blanked["low"] > 0.55


def test_audit_does_not_flag_a_shortcut_when_there_is_none(runs):
    report = audit_run(runs["off"], n_boot=200)
    severities = {f["id"]: f["severity"] for f in report["findings"]}
    assert "shortcut" not in severities.values(), report["findings"]
    assert severities["outside_lung_signal"] == "ok"
    assert report["verdict"] in ("warning", "ok", "info")
    assert json.loads((runs["off"] / "audit" / "audit.json").read_text())["verdict"] == report["verdict"]
    # sites differ in acquisition, so the source is readable from the embedding — a risk, not a shortcut, with equal label mixes
    assert report["source_probe"]["full"]["balanced_accuracy"]["estimate"] > report["source_probe"]["full"]["chance"]
    assert np.isfinite(report["saliency"]["overall"]["lung_area_median"])


def test_audit_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CovidCXRError, match="not a directory"):
        audit_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CovidCXRError, match="no checkpoints"):
        audit_run(tmp_path / "empty")
