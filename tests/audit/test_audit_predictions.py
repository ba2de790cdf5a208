"""``covidcxr audit --predictions PRED.csv --data DIR``: the run-based audit's numbers from its scores alone.

A tiny run on phantoms is audited the usual way; then its own scores are written to a CSV
(``image`` as in the collection's manifest, ``probability``, ``split``) and audited from the
CSV alone. Every prediction-based number and finding must be the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.audit.external import audit_predictions
from covidcxr.audit.run import audit_run
from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from covidcxr.rundir import RunDir
from covidcxr.train.data import synthetic_dir
from covidcxr.train.recipe import recipe_from_mapping
from covidcxr.train.run import train_recipe
from generated_data import tiny_train_recipe

PREDICTION_FINDINGS = ("skill", "source_detector", "within_source", "metadata_only", "view_dependence", "unseen")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("predaudit")
    recipe = tiny_train_recipe(root, name="pred", data={
        "synthetic": {"n_images": 120, "size": 64, "seed": 3},
        "task": "covid_vs_rest",
        "split": {"test_size": 0.35, "val_size": 0.25},
    }, train={"epochs": 2})
    run_dir = train_recipe(recipe_from_mapping(recipe), progress=False).run_dir
    report = audit_run(run_dir, n_boot=60, seed=0)
    collection = synthetic_dir(RunDir(run_dir).read_recipe())
    manifest = RunDir(run_dir).read_manifest()
    stored = RunDir(run_dir).read_predictions()
    relative = lambda p: str(Path(p).resolve().relative_to(collection.resolve()))  # noqa: E731  (as in manifest.csv)
    train = manifest[manifest["split"] == "train"]
    test = stored[stored["split"] == "test"]
    csv = pd.concat([
        pd.DataFrame({"image": train["image"].map(relative), "probability": None, "split": "train"}),
        pd.DataFrame({"image": test["image"].map(relative), "probability": test["probability"].map(repr), "split": "test"}),
    ])
    path = root / "preds.csv"
    csv.to_csv(path, index=False)
    return report, path, collection


def test_predictions_audit_gives_the_run_audit_numbers(audited) -> None:
    report, path, collection = audited
    alone = audit_predictions(path, collection, n_boot=60, seed=0, threshold=report["threshold"])
    evaluation, reference = alone["evaluation"], report["evaluation"]
    for key in ("overall", "per_source", "seen_unseen", "within_source", "within_source_unseen", "source_only", "training_sources"):
        assert evaluation[key] == reference[key], key
    assert alone["confounders"] == report["confounders"] and report["confounders"]["subgroups"]
    assert alone["label_mix"] == report["label_mix"]
    by_id = lambda findings: {f["id"]: f for f in findings if f["id"] in PREDICTION_FINDINGS}  # noqa: E731
    assert by_id(alone["findings"]) == by_id(report["findings"]) and by_id(alone["findings"])
    assert set(alone["not_available"]) >= {"lung_ablation", "source_probe", "saliency", "intensity"}
    assert alone["verdict"] in ("no_skill", "shortcut", "warning", "ok")


def test_predictions_audit_cli_and_bad_rows(audited, tmp_path) -> None:
    report, path, collection = audited
    result = CliRunner().invoke(app, ["audit", "--predictions", str(path), "--data", str(collection), "--json", "--n-boot", "60",
                                      "--threshold", str(report["threshold"]), "--training-sources", "site_a,site_b,site_c"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["evaluation"]["per_source"] == report["evaluation"]["per_source"]
    assert (path.parent / "preds-audit" / "audit.json").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("image,probability\nno/such.png,0.3\n")
    with pytest.raises(CovidCXRError, match="row 2 .*no/such.png"):
        audit_predictions(bad, collection)
    first = pd.read_csv(path).query("split == 'test'").iloc[0]["image"]
    bad.write_text(f"image,probability\n{first},1.7\n")
    with pytest.raises(CovidCXRError, match="row 2: probability"):
        audit_predictions(bad, collection)
    bad.write_text("image,score\nx.png,0.1\n")
    with pytest.raises(CovidCXRError, match="missing column.*probability"):
        audit_predictions(bad, collection)
