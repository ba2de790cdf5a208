"""Recipe schema: defaults, errors that name the field, --set overrides, the config hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covidcxr.train.recipe import RecipeError, TrainRecipe, apply_overrides, load_recipe, recipe_from_mapping

REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"synthetic": {"n_images": 30, "size": 64}}}


def _error(data: dict) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        recipe_from_mapping(data)
    return info.value


def _with(section: str, values: dict) -> dict:
    return {**BASE, section: values}


def test_defaults_are_filled_and_round_trip(tmp_path: Path) -> None:
    recipe = recipe_from_mapping(BASE)
    assert recipe.optimizer.name == "adam" and recipe.train.epochs == 10 and recipe.preprocess.size == (224, 224)
    assert recipe.classes == ("rest", "covid") and recipe.num_outputs == 1
    path = tmp_path / "config.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again.config_hash() == recipe.config_hash()
    loaded = yaml.safe_load(path.read_text())
    assert set(loaded) >= {"data", "preprocess", "model", "optimizer", "schedule", "train", "early_stopping", "augmentation", "snapshots", "engine", "output"}


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (_with("optimizer", {"lr": 0}), "optimizer.lr", "must be > 0"),
        (_with("optimizer", {"lr": -1.0}), "optimizer.lr", "must be > 0"),
        (_with("optimizer", {"name": "lamb"}), "optimizer.name", "must be one of"),
        (_with("optimizer", {"learning_rate": 1e-3}), "optimizer.learning_rate", "unknown field"),
        (_with("train", {"epochs": 0}), "train.epochs", "must be >= 1"),
        (_with("model", {"name": "resnet7"}), "model.name", "unknown model"),
        (_with("model", {"freeze": "half"}), "model.freeze", "must be one of"),
        (_with("model", {"freeze": {"layer_cutoff": -2}}), "model.freeze", "non-negative"),
        (_with("augmentation", {"elastic": 0.5}), "augmentation.elastic", "rigid"),
        (_with("augmentation", {"rotation_degrees": 90}), "augmentation.rotation_degrees", "must be <= 45"),
        (_with("schedule", {"name": "cyclic"}), "schedule.max_lr", "needs"),
        (_with("schedule", {"name": "cyclic", "max_lr": 1e-5}), "schedule.max_lr", "must exceed"),
        (_with("engine", {"precision": "8-bit"}), "engine.precision", "must be one of"),
        ({"data": {"synthetic": {}, "task": "covid_vs_all"}}, "data.task", "must be one of"),
        ({"data": {"synthetic": {}, "split": {"kind": "loso"}}}, "data.split.test_source", "loso"),
        ({"data": {"synthetic": {}, "split": {"folds": 5, "fold": 5}}}, "data.split.fold", "below"),
        ({"data": {}}, "data.collection", "name the images"),
        ({"data": {"synthetic": {}, "split": {"val_size": 0}}}, "train.monitor", "no validation split"),
        ({"data": {"synthetic": {}}, "preprocess": {"size": 4}}, "preprocess.size.0", "must be >= 8"),
        ({"optimizer": {"lr": 1}}, "data", "is required"),
    ],
)
def test_errors_name_the_field(data: dict, field: str, words: str) -> None:
    error = _error(data)
    assert field in error.fields, error.fields
    assert f"recipe field '{field}'" in str(error)
    assert words in str(error)


def test_snapshot_and_early_stopping_cross_checks() -> None:
    error = _error({**BASE, "snapshots": {"count": 7, "gap_epochs": 10, "start": "last"}, "train": {"epochs": 20}})
    assert "snapshots.count" in error.fields and "61 epochs" in str(error)
    error = _error({**BASE, "snapshots": {"count": 2, "start": "last", "gap_epochs": 1}, "early_stopping": {"enabled": True}})
    assert "snapshots.start" in error.fields


def test_overrides_parse_yaml_scalars_and_collections() -> None:
    data = apply_overrides(BASE, ["optimizer.lr=1e-3", "train.epochs=3", "data.sources=[site_a, site_b]", "model.pretrained=null", "name=x"])
    recipe = recipe_from_mapping(data)
    assert recipe.optimizer.lr == pytest.approx(1e-3) and recipe.train.epochs == 3
    assert recipe.data.sources == ["site_a", "site_b"] and recipe.model.pretrained is None and recipe.name == "x"
    assert BASE["data"] == {"synthetic": {"n_images": 30, "size": 64}}  # a copy was changed


def test_bad_overrides_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(RecipeError, match="optimizer.lrr"):
        load_recipe(path, ["optimizer.lrr=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(path, ["optimizer.lr"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(path, ["data.synthetic.size.x=1"])
    with pytest.raises(RecipeError, match="recipe field 'seed'"):
        load_recipe(path, ["seed.x=1"])
    with pytest.raises(RecipeError, match="must be > 0"):
        load_recipe(path, ["optimizer.lr=0"])


def test_load_recipe_names_paths_and_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "my_recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"collection": "phantoms"}, "preprocess": {"cache_dir": "cache"}}))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.name == "my_recipe"
    assert recipe.data.collection == str(tmp_path / "phantoms") and recipe.preprocess.cache_dir == str(tmp_path / "cache")
    assert recipe.run_dir() == tmp_path / "runs" / "my_recipe"
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_config_hash_ignores_engine_output_and_epochs_only() -> None:
    recipe = recipe_from_mapping(BASE)
    same = recipe.with_updates({"engine.devices": 4, "engine.precision": "32", "output.run_dir": "/elsewhere", "train.epochs": 50, "name": "other"})
    assert same.config_hash() == recipe.config_hash()
    for key, value in (("optimizer.lr", 0.1), ("seed", 1), ("data.split.fold", None), ("preprocess.size", 128), ("augmentation.hflip", 0.5)):
        changed = recipe.with_updates({key: value})
        if key == "data.split.fold":
            continue
        assert changed.config_hash() != recipe.config_hash(), key


@pytest.mark.parametrize(
    "name",
    ["demo.yaml", "small_shared.yaml", "tartaglione2020_pretrain.yaml", "tartaglione2020.yaml", "hall2020.yaml", "benahmed2021.yaml", "apostolopoulos2020.yaml"],
)
def test_shipped_recipes_validate_and_build_their_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from covidcxr.train.module import CXRClassifierModule

    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / name)
    assert isinstance(recipe, TrainRecipe)
    assert recipe.augmentation.rotation_degrees <= 10  # rigid and small
    CXRClassifierModule(recipe.resolved())  # the network, its head and freeze policy build
