"""Shipped models (`covidcxr.zoo`): the registry, packaging, read-only loading, ``--model`` resolution.

A tiny phantom run (trained in seconds) is packaged into a temporary models folder that the
registry is pointed at, so these tests do not depend on the real packaged weights.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import covidcxr.zoo as zoo
from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from generated_data import tiny_train_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A trained, evaluated, audited tiny run (the audit verdict is test data: the packager only copies it)."""
    from covidcxr.evaluate.cross_source import evaluate_run
    from covidcxr.train import recipe_from_mapping, train_recipe

    root = tmp_path_factory.mktemp("zoo-run")
    recipe = tiny_train_recipe(root, "zoo-tiny", train={"epochs": 2, "batch_size": 8, "checkpoint_every_n_steps": 0}, operating_point={"rule": "youden"})
    run_dir = train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None).run_dir
    evaluate_run(run_dir, n_boot=50)
    (run_dir / "audit").mkdir()
    (run_dir / "audit" / "audit.json").write_text(json.dumps({"verdict": "warning", "findings": [
        {"id": "source_probe", "severity": "warning", "text": "the source is readable from the embeddings", "value": 0.9, "threshold": 0.7}
    ]}))
    return run_dir


@pytest.fixture(scope="module")
def packaged(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run packaged as the shipped model 'covid' in a temporary models folder."""
    from covidcxr.zoo.package import package_run

    models = tmp_path_factory.mktemp("zoo-models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo.REGISTRY, "covid", zoo.ShippedModel("covid", "covid_vs_rest", "tiny phantom model", "recipes/shipped_covid.yaml", models / "covid"))
        return package_run(tiny_run, "covid", models_dir=models, collection=None)


@pytest.fixture()
def registry(packaged: Path, monkeypatch) -> zoo.ShippedModel:
    """The registry's 'covid' entry pointing at the packaged tiny model."""
    entry = zoo.ShippedModel("covid", "covid_vs_rest", "tiny phantom model", "recipes/shipped_covid.yaml", packaged)
    monkeypatch.setitem(zoo.REGISTRY, "covid", entry)
    return entry


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_registry_names_and_errors() -> None:
    assert zoo.list_models() == ["covid", "pneumonia"] and zoo.DEFAULT_MODEL == "covid"
    assert zoo.is_shipped("pneumonia") and not zoo.is_shipped("model.yaml") and not zoo.is_shipped(None)
    with pytest.raises(CovidCXRError, match=r"'resnet'.*not a shipped model.*covid, pneumonia"):
        zoo.get("resnet")
    absent = zoo.ShippedModel("gone", "covid_vs_rest", "-", "recipes/shipped_gone.yaml", Path("/nonexistent/gone"))
    with pytest.raises(CovidCXRError, match=r"not in this installation.*python -m covidcxr.zoo.package recipes/shipped_gone.yaml gone"):
        absent.metadata()


def test_package_holds_a_half_precision_run_with_its_metadata(registry: zoo.ShippedModel, tiny_run: Path) -> None:
    folder = registry.folder
    checkpoint = torch.load(folder / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    floats = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats) and "optimizer_states" not in checkpoint
    meta = registry.metadata()
    assert registry.labels == ["rest", "covid"] and registry.resolution == [64, 64] and registry.verdict == "warning"
    assert registry.threshold == pytest.approx(json.loads((tiny_run / "operating_point.json").read_text())["threshold"])
    assert meta["training_data"]["splits"]["train"]["n_images"] > 0 and meta["bytes_total"] == sum(meta["bytes"].values())
    assert meta["reproduce"] == "python -m covidcxr.zoo.package recipes/shipped_covid.yaml covid"
    card = registry.card.read_text()
    assert "NOT FOR MEDICAL USE" in card
    for needed in ( "WARNING", "Must not be used for", meta["reproduce"], "pending", "Youden"):
        assert needed in card, needed
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    reference = np.load(folder / "inference" / "reference.npz")
    assert reference["embeddings"].dtype == np.float16


def test_shipped_model_loads_and_predicts_from_a_read_only_folder(registry: zoo.ShippedModel, tiny_run: Path) -> None:
    from covidcxr.serve.predictor import Predictor
    from covidcxr.train.inference import load_run

    folder = registry.folder
    before = _snapshot(folder)
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for path in modes:  # as in a root-owned site-packages
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        if os.geteuid() != 0:  # root ignores permissions; the snapshot below still proves nothing was written
            with pytest.raises(PermissionError):
                (folder / "probe").write_text("x")
        run = load_run(zoo.resolve(None))
        assert all(p.dtype == torch.float32 for p in run.model.parameters())
        predictor = Predictor.load()  # no run named: the shipped default
        assert predictor.reference is not None, predictor.reference_problem
        image = pd.read_parquet(tiny_run / "manifest.parquet").query("split == 'test'")["image"].iloc[0]
        shipped = predictor.predict_file(image, gradcam=True)
        original = load_run(tiny_run).predict_files([image])["probability"].iloc[0]
        assert shipped.probability == pytest.approx(original, abs=0.01)  # float16 weights, float32 compute
        assert predictor.model_card()["audit"]["verdict"] == "warning"
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert _snapshot(folder) == before


def test_select_and_working_copy(registry: zoo.ShippedModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder, said = zoo.select(None, None)
    assert folder == registry.folder and said.startswith("no --run or --model given: the shipped model 'covid'")
    assert str(tmp_path) not in said and "/" not in said.split("(")[0]  # the page shows it: no path
    assert zoo.select(Path("runs/mine"), None) == (Path("runs/mine"), None)
    with pytest.raises(CovidCXRError, match="not both"):
        zoo.select(Path("runs/mine"), "covid")
    with pytest.raises(CovidCXRError, match="give a run directory or --model"):
        zoo.select(None, None, default=False)
    copy, said = zoo.select(None, "covid", writable=True)
    assert copy == Path("runs/shipped-covid") and said.startswith("--model covid:") and "runs/shipped-covid" in said
    (copy / "evaluation.json").write_text("{}")  # writable, and reused as it is
    assert zoo.working_copy("covid") == copy and (copy / "evaluation.json").read_text() == "{}"
    # a file the package gained since the copy was made (e.g. inference/seen_fingerprints.npz) is added
    shipped_file = sorted(p for p in registry.folder.rglob("*") if p.is_file() and p.name not in ("evaluation.json", "zoo.json"))[0]
    (copy / shipped_file.relative_to(registry.folder)).unlink()
    assert zoo.working_copy("covid") == copy and (copy / shipped_file.relative_to(registry.folder)).read_bytes() == shipped_file.read_bytes()
    meta = json.loads((copy / "zoo.json").read_text())
    (copy / "zoo.json").write_text(json.dumps({**meta, "weights_sha1": "other"}))
    with pytest.raises(CovidCXRError, match="holds something other than the shipped model 'covid'"):
        zoo.working_copy("covid")
    assert zoo.shipped_name(registry.folder) == "covid" and zoo.shipped_name(copy) is None


def test_predict_without_run_says_which_model(registry: zoo.ShippedModel, tiny_run: Path, tmp_path: Path) -> None:
    image = pd.read_parquet(tiny_run / "manifest.parquet").query("split == 'test'")["image"].iloc[0]
    result = runner.invoke(app, ["predict", image, "--out", str(tmp_path / "o"), "--no-gradcam"])
    assert result.exit_code == 0, result.output
    assert "no --run or --model given: the shipped model 'covid'" in result.output and "MODEL_CARD.md" in result.output
    result = runner.invoke(app, ["predict", image, "--model", "covid", "--json", "--no-overlays", "--no-gradcam"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["run"] == "zoo-tiny"
    result = runner.invoke(app, ["predict", image, "--model", "covid", "--run", str(tiny_run)])
    assert isinstance(result.exception, CovidCXRError) and "not both" in str(result.exception)
    result = runner.invoke(app, ["predict", image, "--model", "chexnet"])
    assert isinstance(result.exception, CovidCXRError) and "not a shipped model" in str(result.exception)


def test_evaluate_and_audit_take_a_shipped_name(registry: zoo.ShippedModel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "--model", "covid", "--json", "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"] == "zoo-tiny" and (tmp_path / "runs" / "shipped-covid" / "evaluation.json").is_file()
    result = runner.invoke(app, ["audit", "--model", "foreign.yaml"])  # not a shipped name: a foreign MODEL.yaml
    assert isinstance(result.exception, CovidCXRError) and "--model needs --data DIR" in str(result.exception)


def test_packaged_files_hold_no_server_path(tmp_path: Path) -> None:
    from covidcxr.zoo.package import _portable_paths

    root, run_path, folder = tmp_path / "data" / "cxr", tmp_path / "runs" / "shipped_x", tmp_path / "pkg"
    (folder / "audit").mkdir(parents=True)
    pd.DataFrame({"image": [f"{root}/nih/a.png", "elsewhere/b.png"], "mask": [None, f"{root}/m.png"], "mask_alt": [f"{root}/g.png", None], "age": [3, 4]}).to_parquet(folder / "manifest.parquet")
    (folder / "audit" / "audit.json").write_text(json.dumps({"run_dir": str(run_path), "images": f"{root}/nih"}))
    _portable_paths(folder, run_path, str(root), "../shared/data/cxr")
    frame = pd.read_parquet(folder / "manifest.parquet")
    assert frame["image"].tolist() == ["../shared/data/cxr/nih/a.png", "elsewhere/b.png"]
    assert pd.isna(frame["mask"].iloc[0]) and frame["mask"].iloc[1] == "../shared/data/cxr/m.png"
    assert frame["mask_alt"].iloc[0] == "../shared/data/cxr/g.png" and frame["age"].tolist() == [3, 4]
    assert json.loads((folder / "audit" / "audit.json").read_text()) == {"run_dir": ".", "images": "../shared/data/cxr/nih"}


def test_serve_without_run_says_which_model_on_the_page(registry: zoo.ShippedModel, monkeypatch) -> None:
    import covidcxr.serve.server
    from fastapi.testclient import TestClient

    captured: dict = {}

    class Captured:
        def __init__(self, app, host, port, limits):  # noqa: ANN001
            captured["app"] = app

        def run(self) -> None:
            pass

    monkeypatch.setattr(covidcxr.serve.server, "build_server", Captured)
    monkeypatch.delenv("COVIDCXR_SERVE_TOKEN", raising=False)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 0, result.output
    assert "no --run or --model given: the shipped model 'covid'" in result.output
    card = TestClient(captured["app"]).get("/model").json()
    assert card["selected"].startswith("no --run or --model given: the shipped model 'covid'")
    assert str(registry.folder) not in json.dumps(card["selected"])  # the page never shows a server path
    page = (Path(zoo.__file__).parents[1] / "serve" / "static" / "app.js").read_text()
    assert "card.selected" in page


def test_half_checkpoint_is_the_same_bytes_every_time(tiny_run: Path, tmp_path: Path) -> None:
    from covidcxr.zoo.package import half_checkpoint

    recipe = {"name": "x"}
    sizes = [half_checkpoint(tiny_run / "checkpoints" / "best.ckpt", tmp_path / name / "best.ckpt", recipe) for name in ("a", "b")]
    assert sizes[0] == sizes[1] < (tiny_run / "checkpoints" / "best.ckpt").stat().st_size
    assert (tmp_path / "a" / "best.ckpt").read_bytes() == (tmp_path / "b" / "best.ckpt").read_bytes()
