"""ONNX export of the classifier and lung U-Net: stated tolerance met, the service runs on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from covidcxr.errors import CovidCXRError
from covidcxr.serve.app import create_app
from covidcxr.serve.engines import OnnxClassifier, OnnxLungSegmenter, TorchClassifier
from covidcxr.serve.errors import EngineUnavailable
from covidcxr.serve.onnx_export import TOLERANCE, export_onnx, measure_agreement, read_export
from covidcxr.serve.predictor import Predictor
from covidcxr.train.inference import load_run
from serve_fixtures import copy_run, split_images, tiny_run

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("onnx") / "run")
    Predictor.load(run_dir)  # builds the reference, whose training images the export samples
    return run_dir, export_onnx(run_dir)


def test_export_states_and_meets_its_tolerance(exported) -> None:
    run_dir, summary = exported
    folder = run_dir / "export"
    assert {p.name for p in folder.iterdir()} == {"classifier.onnx", "lung_unet.onnx", "export.json"}
    assert json.loads((folder / "export.json").read_text()) == summary
    assert summary["tolerance"] == TOLERANCE
    assert summary["samples"].startswith("8 training images")
    assert summary["classifier"]["max_abs_diff_probability"] <= TOLERANCE
    assert summary["lung_unet"]["max_abs_diff_probability"] <= TOLERANCE
    assert summary["lung_unet"]["mask_dice_vs_torch_bf16_fast_path_mean"] >= 0.95
    assert sum(summary["classifier"]["stage_sizes"]) == summary["classifier"]["outputs"]["stage_embeddings"][1]


def test_onnx_matches_pytorch_on_real_inputs_and_any_batch(exported) -> None:
    run_dir, _ = exported
    run = load_run(run_dir)
    import pandas as pd

    from covidcxr.train.inference import cached_inputs

    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    _, images, _, _ = cached_inputs(manifest[manifest["split"] == "test"].head(7), run.recipe)
    torch_p, torch_e = TorchClassifier(run)(images)
    onnx_p, onnx_e = OnnxClassifier(run_dir / "export" / "classifier.onnx")(images)  # batch 7: dynamic
    assert onnx_p.shape == (7,) and np.abs(onnx_p - torch_p).max() <= TOLERANCE
    assert np.abs(onnx_e - torch_e).max() <= 1e-3 * max(1.0, np.abs(torch_e).max())
    single_p, _ = OnnxClassifier(run_dir / "export" / "classifier.onnx")(images[:1])
    assert single_p[0] == pytest.approx(onnx_p[0], abs=1e-6)
    segmenter = OnnxLungSegmenter(run_dir / "export" / "lung_unet.onnx")
    assert [m.shape for m in segmenter.segment_batch(list(images[:2]))] == [images.shape[1:]] * 2


def test_the_predictor_and_service_run_on_onnxruntime(exported) -> None:
    run_dir, _ = exported
    torch_engine = Predictor.load(run_dir, engine="torch")
    onnx_engine = Predictor.load(run_dir, engine="onnx")
    for image in split_images(run_dir, "test")[:5]:
        a = torch_engine.predict_file(image, gradcam=False)
        b = onnx_engine.predict_file(image, gradcam=True)
        # masks may differ in a few pixels (bf16 PyTorch U-Net vs float32 ONNX); with lungs: none
        # the classifier input does not depend on them
        assert b.probability == pytest.approx(a.probability, abs=TOLERANCE)
        assert b.decision == a.decision and b.model_decision == a.model_decision
        assert "computed with PyTorch" in b.saliency["method"]
    with TestClient(create_app(onnx_engine)) as client:
        data = Path(split_images(run_dir, "test")[0]).read_bytes()
        body = client.post("/predict", files={"file": ("x.png", data)}).json()
        assert body["engine"] == "onnx" and 0 <= body["probability"] <= 1
        assert client.get("/model").json()["onnx_export"]["tolerance"] == TOLERANCE


def test_missing_or_stale_exports_are_refused(exported, tmp_path: Path) -> None:
    run_dir, _ = exported
    fresh = copy_run(run_dir, tmp_path / "fresh")
    (fresh / "export" / "export.json").unlink()
    with pytest.raises(EngineUnavailable, match="covidcxr export .* --onnx"):
        Predictor.load(fresh, engine="onnx")
    stale = copy_run(run_dir, tmp_path / "stale")
    summary = json.loads((stale / "export" / "export.json").read_text())
    summary["checkpoint_sha1"] = "0" * 40
    (stale / "export" / "export.json").write_text(json.dumps(summary))
    with pytest.raises(EngineUnavailable, match="another checkpoint"):
        read_export(stale, load_run(stale).checkpoint)


def test_auto_uses_a_current_export_and_otherwise_says_why_not(exported, tmp_path: Path) -> None:
    run_dir, _ = exported
    auto = Predictor.load(run_dir)  # engine="auto" is the default
    assert auto.engine == "onnx" and isinstance(auto.classifier, OnnxClassifier) and "auto" in auto.engine_note
    assert auto.engine_problem is None
    without = copy_run(run_dir, tmp_path / "without")
    (without / "export" / "export.json").unlink()
    fallback = Predictor.load(without)
    assert fallback.engine == "torch" and isinstance(fallback.classifier, TorchClassifier)
    assert "covidcxr export RUN --onnx" in fallback.engine_note and "export.json" in fallback.engine_problem
    card = fallback.model_card()
    assert card["engine"] == "torch" and card["engine_note"] == fallback.engine_note
    assert str(tmp_path) not in json.dumps(card["engine_note"])  # the note reaches GET /model: no server path
    image = split_images(run_dir, "test")[0]
    assert fallback.predict_file(image, gradcam=False).probability == pytest.approx(auto.predict_file(image, gradcam=False).probability, abs=TOLERANCE)


def test_a_disagreeing_export_is_an_error(exported, monkeypatch) -> None:
    from covidcxr.serve import engines

    run_dir, _ = exported
    original = engines.OnnxClassifier.__call__

    def drifted(self, images):
        probabilities, embeddings = original(self, images)
        return probabilities + 1e-3, embeddings  # an export 10x outside the tolerance

    monkeypatch.setattr(engines.OnnxClassifier, "__call__", drifted)
    with pytest.raises(CovidCXRError, match="disagrees with PyTorch"):
        measure_agreement(load_run(run_dir), run_dir / "export")
