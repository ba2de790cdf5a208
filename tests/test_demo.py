"""The demo journey end to end, on tiny recipes (the real ones run in `make demo`)."""

import json

import pandas as pd
import yaml

from covidcxr.demo import SYNTHETIC_RECIPES, run_demo


def _tiny_recipes(root):
    (root / "recipes").mkdir(parents=True)
    common = {
        "seed": 0,
        "preprocess": {"size": 64, "lungs": "none", "mask_source": "manifest", "workers": 1},
        "model": {"name": "resnet18", "head": "linear"},
        "optimizer": {"name": "adam", "lr": 3.0e-3},
        "train": {"epochs": 2, "batch_size": 16, "checkpoint_every_n_steps": 0},
        "engine": {"threads": 1, "progress_bar": False},
    }
    pretrain = {
        "name": "tiny_pretrain",
        "data": {"synthetic": {"n_images": 90, "size": 64, "seed": 100}, "task": "pneumonia_vs_normal", "sources": ["site_a", "site_b"]},
        **common,
    }
    finetune = {
        "name": "tiny_demo",
        "data": {
            "synthetic": {"n_images": 120, "size": 64, "seed": 0, "shortcut": {"kind": "marker", "site": "site_a", "label": "covid"}, "label_mix": {"covid": 0.5, "normal": 0.3, "pneumonia": 0.2}},
            "task": "covid_vs_rest",
            "sources": ["site_a", "site_b"],
        },
        **common,
    }
    for name, recipe in zip(SYNTHETIC_RECIPES, (pretrain, finetune)):
        (root / name).write_text(yaml.safe_dump(recipe))


def test_demo_journey_reaches_the_report(tmp_path):
    _tiny_recipes(tmp_path / "repo")
    out = tmp_path / "demo"
    lines = []
    result = run_demo(out, repo_root=tmp_path / "repo", progress=False, n_boot=100, say=lines.append)
    # two stages, the second initialised from the first
    assert (result.pretrain_run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((result.run / "metrics.json").read_text())
    assert metrics["pretrained"] is not None
    # the unseen site was tested beside the seen sites' held-out patients
    predictions = pd.read_parquet(result.run / "predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    assert set(test["source"]) == {"site_a", "site_b", "site_c"}
    assert set(test.loc[test["source"] == "site_c", "test_set"]) == {"unseen_source"}
    assert result.evaluation["seen_unseen"]["unseen_sources"] == ["site_c"]
    assert result.evaluation["training_sources"] == ["site_a", "site_b"]
    # audit and report written; a second run reuses everything and adds no duplicate rows
    assert (result.run / "audit" / "audit.json").is_file()
    html = result.report.read_text()
    assert result.report.name == "report.html" and "site_c" in html
    results = json.loads(result.results_json.read_text())
    assert results["runs"]
    # the report states the planted shortcut, with an outcome read off the audit's findings
    truth = results["ground_truth"]
    assert truth["site"] == "site_a" and truth["description"] == "a text marker was planted on COVID images of site_a"
    assert truth["runs"][0]["outcome"] in {"found", "flagged", "missed"} and truth["runs"][0]["sentence"] in html.replace("&#39;", "'")
    # the unseen site is in the composition and in the t-SNE map
    assert results["runs"][0]["composition"]["tested_only_sources"] == ["site_c"]
    assert "site_c" in set(results["runs"][0]["audit"]["embedding_points"]["source"])
    assert any("planted shortcut" in line for line in lines)
    # exported for predict/serve: the default engine ("auto") runs it on onnxruntime
    assert (result.run / "export" / "export.json").is_file() and any("ONNX export for" in line for line in lines)
    from covidcxr.serve.predictor import Predictor

    assert Predictor.load(result.run).engine == "onnx"
    again = run_demo(out, repo_root=tmp_path / "repo", progress=False, n_boot=50, say=lambda _l: None, onnx_export=False)
    assert len(pd.read_parquet(again.run / "predictions.parquet")) == len(predictions)
