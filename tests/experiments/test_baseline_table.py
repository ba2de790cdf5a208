"""The leave-one-source-out table: AUC within the held-out source, paired DeLong difference to the baseline, audit verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.stats import delong_test
from covidcxr.experiments.recipe import load_experiment
from covidcxr.experiments.store import RunStore
from covidcxr.experiments.table import baseline_table, grid_table, markdown_baseline_table, markdown_table, paired_auc_difference
from generated_data import tiny_train_recipe

runner = CliRunner()


def test_paired_difference_is_the_delong_difference_with_its_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    base = rng.normal(size=120) + 0.5 * y
    better = base + 1.5 * y  # the same images, more separated
    result = paired_auc_difference(y, better, base)
    assert result["delta"] == pytest.approx(roc_auc_score(y, better) - roc_auc_score(y, base))
    assert result["delta_low"] > 0 and result["delta_p"] < 0.05 and result["n_paired"] == 120
    test = delong_test(y, better, base)
    half = (result["delta_high"] - result["delta_low"]) / 2
    assert half == pytest.approx(1.959964 * np.sqrt(test["var_a"] + test["var_b"] - 2 * test["covariance"]), rel=1e-5)
    same = paired_auc_difference(y, base, base)
    assert same["delta"] == 0 and same["delta_p"] == 1.0 and same["delta_low"] == same["delta_high"] == 0


def _loso_grid(tmp_path: Path) -> Path:
    recipe = tiny_train_recipe(tmp_path, "losogrid", data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "covid_vs_rest",
                                                           "split": {"kind": "loso", "test_source": "site_a", "val_size": 0.25}})
    recipe["experiment"] = {
        "grid": {
            "heldout": {"a": {"data.split.test_source": "site_a"}, "b": {"data.split.test_source": "site_b"}},
            "method": {"baseline": {}, "groupdro": {"domain.group_dro": {"eta": 0.1}}},
        },
        "test_sources": "all",
        "n_boot": 30,
    }
    path = tmp_path / "losogrid.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_loso_grid_table_compares_each_method_to_the_baseline_within_the_held_out_source(tmp_path: Path) -> None:
    path = _loso_grid(tmp_path)
    db = f"sqlite:///{tmp_path / 'grid.sqlite'}"
    assert runner.invoke(app, ["experiment", "run", str(path), "--db", db, "--precision", "32"]).exit_code == 0
    experiment = load_experiment(path)
    store = RunStore(db)
    table = baseline_table(experiment, store, "method", "baseline")
    assert table.columns == ["a", "b"] and len(table.rows) == 4
    assert (table.rows["status"] == "done").all() and table.rows["verdict"].isna().all()
    runs = store.find_runs(experiment).set_index("key")
    for row in table.rows.to_dict("records"):
        source = {"a": "site_a", "b": "site_b"}[row["column"]]
        assert row["heldout_source"] == source
        mine = store.predictions_frame([int(runs.loc[f"heldout={row['column']}/method={row['method']}", "id"])])
        mine = mine[mine["source"] == source].sort_values("image")
        assert row["n_images"] == len(mine) and row["auc"] == pytest.approx(roc_auc_score(mine["positive"], mine["probability"]))
        if row["method"] == "baseline":
            assert np.isnan(row["delta"])
            continue
        base = store.predictions_frame([int(runs.loc[f"heldout={row['column']}/method=baseline", "id"])])
        base = base[base["source"] == source].sort_values("image")
        assert list(base["image"]) == list(mine["image"]) and row["n_paired"] == len(mine)
        expected = roc_auc_score(mine["positive"], mine["probability"]) - roc_auc_score(base["positive"], base["probability"])
        assert row["delta"] == pytest.approx(expected) and row["delta_low"] <= row["delta"] <= row["delta_high"]
    text = markdown_baseline_table(table)
    assert "| method | site_a held out (n=" in text and text.count("\n| groupdro |") == 1 and "audit: not audited" in text

    # the verdict comes from each run's audit.json once `covidcxr experiment audit` has run
    audited = runner.invoke(app, ["experiment", "audit", str(path), "--db", db, "--max-images", "60", "--n-boot", "20"])
    assert audited.exit_code == 0, audited.output
    verdicts = baseline_table(experiment, store, "method", "baseline").rows["verdict"]
    assert verdicts.isin(["ok", "warning", "shortcut", "no_skill"]).all()
    assert "already audited" in runner.invoke(app, ["experiment", "audit", str(path), "--db", db]).output
    cli = runner.invoke(app, ["experiment", "table", str(path), "--db", db, "--baseline", "method=baseline", "--format", "json"])
    assert cli.exit_code == 0, cli.output
    rows = json.loads(cli.stdout)["versus_baseline"]["rows"]
    assert [r["verdict"] for r in rows] == list(verdicts)

    # a method added later: its points are not registered yet, both tables still print
    grown = load_experiment(path, ["experiment.grid.method.adversarial={domain.adversarial: {weight: 0.3}}"])
    table = baseline_table(grown, store, "method", "baseline")
    assert list(table.rows.loc[table.rows["method"] == "adversarial", "status"]) == ["not registered"] * 2
    assert "| adversarial | not registered | not registered |" in markdown_baseline_table(table)
    assert "| a | adversarial |" in markdown_table(grid_table(grown, store))


def test_baseline_table_errors_name_the_axis_label_or_split(tmp_path: Path) -> None:
    path = _loso_grid(tmp_path)
    experiment = load_experiment(path)
    store = RunStore(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(CovidCXRError, match="no axis 'methods'"):
        baseline_table(experiment, store, "methods", "baseline")
    with pytest.raises(CovidCXRError, match="no point has method='erm'"):
        baseline_table(experiment, store, "method", "erm")
    holdout = load_experiment(path, ["data.split.kind=holdout"])
    with pytest.raises(CovidCXRError, match="must be 'loso', not 'holdout'"):
        baseline_table(holdout, store, "method", "baseline")
    bad = runner.invoke(app, ["experiment", "table", str(path), "--db", f"sqlite:///{tmp_path / 'empty.sqlite'}", "--baseline", "method"])
    assert bad.exit_code != 0 and "AXIS=LABEL" in bad.output


def test_generalize_recipe_runs_the_baseline_first_for_every_held_out_source() -> None:
    experiment = load_experiment(Path(__file__).resolve().parents[2] / "recipes" / "generalize.yaml")
    points = experiment.points()
    assert experiment.axes == ["method", "heldout"] and len(points) == 18
    assert [p.labels["method"] for p in points[:3]] == ["baseline"] * 3
    assert [p.labels["heldout"] for p in points[:3]] == ["nih", "kermany", "figure1"]
    for point in points:
        assert point.recipe.data.split.kind == "loso" and point.recipe.data.split.test_source == point.labels["heldout"]
    base = experiment.base_recipe
    assert (base.model.name, base.preprocess.size, base.train.epochs, base.engine.threads) == ("small_cnn", (128, 128), 12, 1)
