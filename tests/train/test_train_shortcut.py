"""The same recipe learns a planted shortcut when it is on (the issue's "must show", on phantoms).

Phantoms (`covidcxr.data.synth`) carry the COVID finding only inside the lungs (subtle
ground-glass opacities, hard at 64 px); with ``ShortcutSpec(kind="marker", site=None,
label="covid", strength=1.0, false_rate=0.0)`` every COVID image also carries a burned-in
text marker in a corner (at every site, so the marker alone separates the classes), and
``lungs: none`` keeps it visible. A small Conv8 trained for 15 epochs reaches a clearly
higher test AUC with the marker than on the identical phantoms without it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.train import recipe_from_mapping, train_recipe
from generated_data import tiny_train_recipe


def _run(root: Path, name: str, shortcut: dict | None):
    synthetic = {"n_images": 160, "size": 64, "seed": 5, "shortcut": shortcut}
    recipe = tiny_train_recipe(
        root,
        name,
        seed=5,
        data={"synthetic": synthetic, "task": "covid_vs_rest", "split": {"test_size": 0.3, "val_size": 0.2}},
        model={"name": "conv8", "arch_kwargs": {"width": 16}},
        train={"epochs": 15, "batch_size": 16, "checkpoint_every_n_steps": 0},
    )
    return train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None)


def test_the_planted_marker_is_learned(tmp_path: Path) -> None:
    marker = {"kind": "marker", "site": None, "label": "covid", "strength": 1.0, "false_rate": 0.0}
    with_marker = _run(tmp_path, "marker-on", marker)
    without = _run(tmp_path, "marker-off", None)
    on, off = with_marker.metrics["test"]["auc"], without.metrics["test"]["auc"]
    assert on >= 0.85, (on, off)
    assert on - off >= 0.15, (on, off)
    # the same patients and splits in both runs: only the marker differs
    a = pd.read_parquet(with_marker.run_dir / "manifest.parquet")
    b = pd.read_parquet(without.run_dir / "manifest.parquet")
    assert sorted(a["patient_id"] + a["split"]) == sorted(b["patient_id"] + b["split"])
    predictions = pd.read_parquet(with_marker.run_dir / "predictions.parquet")
    assert predictions.loc[predictions["shortcut"], "target"].eq(1).all()  # the marker marks covid only
