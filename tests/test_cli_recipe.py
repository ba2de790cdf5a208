"""``covidcxr recipe schema``: every shipped recipe validates against it; typos do not."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.experiments.recipe import recipe_json_schema

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_against_the_experiment_schema(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(recipe_json_schema("experiment"))
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_the_schema_catches_what_the_recipe_reader_refuses() -> None:
    validator = jsonschema.Draft202012Validator(recipe_json_schema("train"))
    good = {"data": {"collection": "x"}, "preprocess": {"size": "200x266"}}
    assert list(validator.iter_errors(good)) == []
    for bad in (
        {"data": {"collection": "x"}, "optimizer": {"lr": "fast"}},      # wrong type
        {"data": {"collection": "x"}, "optimiser": {}},                    # misspelt section
        {"data": {"collection": "x"}, "preprocess": {"size": "big"}},      # not N or HxW
        {"preprocess": {"size": 64}},                                # data is required
        {"data": {"collection": "x"}, "experiment": {}},                   # a grid is not a training recipe
    ):
        assert list(validator.iter_errors(bad)), bad


def test_cli_writes_the_schema(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["recipe", "schema", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    schema = json.loads((tmp_path / "s.json").read_text())
    assert schema["title"] == "covidcxr experiment recipe" and "experiment" in schema["properties"]
    printed = CliRunner().invoke(app, ["recipe", "schema", "--kind", "train"])
    assert printed.exit_code == 0 and "experiment" not in json.loads(printed.stdout)["properties"]
