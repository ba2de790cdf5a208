"""Experiment recipes: validation that names the field, grid expansion, scales, stage-1 sharing, k-fold points."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covidcxr.experiments.recipe import FOLD_AXIS, ExperimentError, load_experiment
from covidcxr.train.recipe import RecipeError, TrainRecipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
PAPER_RECIPES = ["tartaglione2020.yaml", "hall2020.yaml", "benahmed2021.yaml", "apostolopoulos2020.yaml"]


def _write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _base(tmp_path: Path, **experiment) -> dict:
    return {
        "name": "exp",
        "data": {"synthetic": {"n_images": 30, "size": 64}, "task": "covid_vs_rest"},
        "model": {"name": "conv8"},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "experiment": experiment,
    }


def test_tartaglione_grid_expands_with_shared_stage_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    full = load_experiment(REPO / "recipes" / "tartaglione2020.yaml")
    assert full.axes == ["pretrain", "composition", "architecture"]
    points = full.points()
    assert len(points) == 3 * 5 * 5
    # one stage-1 run per (pretraining source, architecture), shared by the 5 compositions
    stage_ones = full.pretrain_runs()
    assert len(stage_ones) == 2 * 5
    users = {}
    for point in points:
        if point.pretrain is not None:
            users.setdefault(point.pretrain.key, set()).add(point.labels["composition"])
            assert point.recipe.model.pretrained == str(point.pretrain.run_dir)
            assert point.pretrain.recipe.model.name == point.recipe.model.name  # inherited: the encoder fits
            assert point.pretrain.recipe.data.sources == [point.labels["pretrain"]]
            assert point.pretrain.recipe.data.task == "pneumonia_vs_normal"
        else:
            assert point.labels["pretrain"] == "none" and point.recipe.model.pretrained is None
    assert all(len(compositions) == 5 for compositions in users.values())
    cohen_kermany = next(p for p in points if p.key == "pretrain=none/composition=cohen+kermany/architecture=densenet121")
    assert cohen_kermany.recipe.data.sources == ["cohen"] and cohen_kermany.recipe.data.negatives_from == ["kermany"]
    assert cohen_kermany.recipe.model.name == "densenet121.tartaglione2020"
    assert cohen_kermany.recipe.preprocess.size == (224, 224) and cohen_kermany.recipe.train.epochs == 20
    assert len({p.run_dir for p in points}) == len(points)  # one directory per point
    assert all(p.run_dir.parent == full.root for p in points) and full.root.name == "tartaglione2020"


def test_small_scale_shrinks_every_run_and_the_stage_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    small = load_experiment(REPO / "recipes" / "tartaglione2020.yaml", ["scale=small"])
    assert small.label == "tartaglione2020@small" and small.root.name == "tartaglione2020-small"
    assert small.axis_labels("architecture") == ["resnet18", "conv8"]
    assert len(small.points()) == 3 * 5 * 2 and len(small.pretrain_runs()) == 2 * 2
    for recipe in [p.recipe for p in small.points()] + [r.recipe for r in small.pretrain_runs()]:
        assert recipe.preprocess.size == (64, 64) and recipe.train.epochs == 5 and recipe.engine.threads == 1
        assert recipe.optimizer.name == "adam" and recipe.data.collection is None
        assert recipe.data.manifest == str(small.root / Path(recipe.data.manifest).name)  # the subset manifest
    assert set(small.subsets.values()) == {str((REPO.parent / "shared" / "data" / "cxr").resolve())}
    assert small.section.n_boot == 200 and small.section.subset.fraction == 0.5
    # --set wins over the scale, experiment.* changes the section, pretrain.* only stage 1
    custom = load_experiment(REPO / "recipes" / "tartaglione2020.yaml", ["scale=small", "train.epochs=2", "experiment.n_boot=50", "pretrain.train.epochs=7"])
    assert {p.recipe.train.epochs for p in custom.points()} == {2}
    assert {r.recipe.train.epochs for r in custom.pretrain_runs()} == {7}
    assert custom.section.n_boot == 50
    assert {p.config_hash for p in custom.points()} != {p.config_hash for p in small.points()}


def test_unknown_scale_and_bad_sections_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ExperimentError, match=r"scale 'huge' is not defined; experiment.scales has \['full', 'medium', 'small'\]"):
        load_experiment(REPO / "recipes" / "tartaglione2020.yaml", ["scale=huge"])
    cases = [
        ({"grid": {"lr": [1, 2]}}, "experiment.grid", "must be a dotted recipe field"),
        ({"grid": {"optimizer.lr": []}}, "experiment.grid", "has no values"),
        ({"grid": {"arch": {"bad label!": {"model.name": "conv8"}}}}, "experiment.grid", "letters, digits"),
        ({"grid": {"fold": {"a": {}}}}, "experiment.grid", "reserved"),
        ({"test_sources": []}, "experiment.test_sources", "at least one source"),
        ({"n_boot": -1}, "experiment.n_boot", "greater than or equal to 0"),
        ({"subset": {"fraction": 1.5}}, "experiment.subset.fraction", "less than or equal to 1"),
        ({"grids": {}}, "experiment.grids", "unknown field"),
    ]
    for experiment, field, words in cases:
        with pytest.raises(ExperimentError) as info:
            load_experiment(_write(tmp_path, _base(tmp_path, **experiment)))
        assert field in info.value.fields, (experiment, info.value.fields)
        assert f"experiment field '{field}'" in str(info.value) and words in str(info.value), str(info.value)


def test_axis_values_are_validated_as_recipes_naming_the_point(tmp_path: Path) -> None:
    path = _write(tmp_path, _base(tmp_path, grid={"optimizer.lr": [0.01, -1.0]}))
    with pytest.raises(RecipeError) as info:
        load_experiment(path).points()
    assert "point optimizer.lr=-1.0" in str(info.value) and "recipe field 'optimizer.lr': must be > 0" in str(info.value)
    path = _write(tmp_path, _base(tmp_path, grid={"arch": {"a": {"model.nme": "conv8"}}}))
    with pytest.raises(RecipeError, match="model.nme"):
        load_experiment(path).points()
    with pytest.raises(ExperimentError, match="experiment.only.arch.*unknown label"):
        load_experiment(_write(tmp_path, _base(tmp_path, grid={"arch": {"a": {}}}, only={"arch": ["b"]}))).points()
    with pytest.raises(ExperimentError, match="not an experiment recipe"):
        load_experiment(REPO / "recipes" / "demo.yaml")


def test_list_axes_kfold_points_and_keys(tmp_path: Path) -> None:
    data = _base(tmp_path, grid={"optimizer.lr": [0.001, 0.0001], "sites": {"a": {"data.sources": ["site_a"]}, "ab": {"data.sources": ["site_a", "site_b"]}}})
    data["data"]["split"] = {"kind": "kfold", "folds": 3}
    experiment = load_experiment(_write(tmp_path, data))
    points = experiment.points()
    assert len(points) == 2 * 2 * 3
    assert points[0].key == "optimizer.lr=0.001/sites=a/fold=0" and points[0].labels[FOLD_AXIS] == "0"
    assert [p.recipe.data.split.fold for p in points[:3]] == [0, 1, 2]
    assert experiment.axis_labels(FOLD_AXIS) == ["0", "1", "2"]
    assert points[1].run_dir.name.startswith("0.001__a__fold1-")
    assert {p.recipe.optimizer.lr for p in points} == {0.001, 0.0001}


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_validate_expand_and_keep_a_trainable_base_point(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    experiment = load_experiment(REPO / "recipes" / name, ["scale=small"])
    points = experiment.points()
    assert points and len({p.key for p in points}) == len(points)
    for point in points:
        assert isinstance(point.recipe, TrainRecipe)
        assert point.recipe.augmentation.rotation_degrees <= 10
    # `covidcxr train` on the same file trains the base point; experiment settings are refused there
    base = load_recipe(REPO / "recipes" / name)
    assert base.name == experiment.name and base.config_hash() == load_experiment(REPO / "recipes" / name).base_recipe.config_hash()
    with pytest.raises(RecipeError, match="covidcxr experiment run"):
        load_recipe(REPO / "recipes" / name, ["scale=small"])
