"""``covidcxr evaluate|audit --model MODEL.yaml --data DIR``: two foreign models audited as black boxes on phantoms.

Phantoms from three sites with a burned-in corner text marker on COVID images of site_c
(`covidcxr.data.synth`, 64 px). Two classifiers built with plain torch
(`tests/foreign_models.py`, hand-set weights, no covidcxr code), exported to ONNX:

* the **corner reader** scores the top-right corner's brightness — the marker: the audit
  must call it a ``shortcut`` (the lungs-blanked AUC stays high at site_c);
* the **lung reader** scores the brightness of the lower lung fields — where the COVID
  opacities are: the audit must *not* call it a shortcut (the lungs-blanked AUC falls to chance).

And a TorchScript export of the lung reader evaluated through the CLI, resumed, and with a
``training_manifest`` whose images are excluded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.audit.external import audit_foreign
from covidcxr.cli import app
from covidcxr.data.manifest import write_manifest
from covidcxr.data.synth import ShortcutSpec, synthesize
from foreign_models import corner_reader, export_onnx, export_torchscript, lung_reader

runner = CliRunner()

MODEL_YAML = """name: {name}
format: {format}
path: {path}
input: {{height: 64, width: 64, channels: 1, range: [0, 1]}}
preprocess: {{equalization: {equalization}, lungs: none, mask_source: manifest}}
output: {{kind: probability, positive_index: 0, positive_label: covid, negative_labels: [normal]{embedding}}}
"""


def write_yaml(folder: Path, name: str, path: str, equalization: str, format: str = "onnx", embedding: str | None = None, extra: str = "") -> Path:
    file = folder / f"{name}.yaml"
    file.write_text(MODEL_YAML.format(name=name, format=format, path=path, equalization=equalization, embedding=f", embedding: {embedding}" if embedding else "") + extra)
    return file


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign-audit")
    phantoms = root / "phantoms"
    synthesize(phantoms, n_images=150, size=64, shortcut=ShortcutSpec("marker", site="site_c"), seed=3, finding_scale=2.0)
    models = root / "models"
    models.mkdir()
    export_onnx(corner_reader(), models / "corner.onnx")
    export_onnx(lung_reader(), models / "lungs.onnx")
    export_torchscript(lung_reader(), models / "lungs.pt")
    # the corner reader sees the raw (min-max stretched) image; the lung reader asks for histogram equalisation
    yamls = {
        "corner": write_yaml(models, "corner", "corner.onnx", "none", embedding="embedding"),
        "lungs": write_yaml(models, "lungs", "lungs.onnx", "histogram"),
        "lungs_ts": write_yaml(models, "lungs-ts", "lungs.pt", "histogram", format="torchscript"),
    }
    return root, phantoms, yamls


def _audit(setting, which):
    root, phantoms, yamls = setting
    return audit_foreign(yamls[which], phantoms, out=root / "out" / which, n_boot=50, cache_dir=root / "cache", workers=1)


def test_corner_reader_is_called_a_shortcut(setting) -> None:
    report = _audit(setting, "corner")
    assert report["verdict"] == "shortcut"
    blanked = next(f for f in report["findings"] if f["id"] == "outside_lung_signal")
    assert blanked["severity"] == "shortcut" and "site_c" in blanked["text"]
    assert report["ablation"]["lungs_blanked"]["per_source_auc"]["site_c"]["low"] > 0.55
    # occlusion saliency, not Grad-CAM: mostly outside the lungs, a warning at most
    saliency = next(f for f in report["findings"] if f["id"] == "saliency_outside_lungs")
    assert saliency["text"].startswith("Occlusion saliency") and saliency["severity"] == "warning"
    assert report["source_probe"]["reads"] == "the model's embedding output"
    root = setting[0]
    written = json.loads((root / "out" / "corner" / "audit" / "audit.json").read_text())
    assert written["verdict"] == "shortcut" and (root / "out" / "corner" / "audit" / "gallery.png").is_file()
    # no training split for a foreign model: said, and nothing excluded as linked
    assert report["training_data"]["known"] is False and "no image could be excluded" in report["training_data"]["note"]
    assert "gradcam" in report["not_available"]
    unseen = next(f for f in report["findings"] if f["id"] == "unseen_sources")
    assert unseen["text"].endswith("(The model's training data are unknown: every source is counted as unseen.)")


def test_lung_reader_is_not_called_a_shortcut(setting) -> None:
    report = _audit(setting, "lungs")
    assert report["verdict"] not in ("shortcut", "no_skill"), [f["text"] for f in report["findings"] if f["severity"] in ("shortcut", "no_skill")]
    severity = {f["id"]: f["severity"] for f in report["findings"]}
    assert severity["skill"] == "ok" and severity["outside_lung_signal"] == "ok"
    assert severity["saliency_outside_lungs"] == "info"  # saliency never earns OK
    assert report["source_probe"]["reads"].startswith("the model's score")
    assert report["intensity"] == {"skipped": report["intensity"]["skipped"]}  # equalised input: the window test does not apply
    per_source = report["evaluation"]["per_source"]
    assert set(per_source) == {"site_a", "site_b", "site_c"}
    for m in per_source.values():
        assert m["n_images"] > 0 and m["n_patients"] > 0 and m["auc"]["low"] <= m["auc"]["estimate"] <= m["auc"]["high"]


def test_torchscript_model_through_the_cli_resumes_and_excludes_its_training_images(setting, monkeypatch) -> None:
    root, phantoms, yamls = setting
    out = root / "out" / "cli"
    command = ["evaluate", "--model", str(yamls["lungs_ts"]), "--data", str(phantoms), "--out", str(out), "--json", "--n-boot", "50",
               "--cache-dir", str(root / "cache"), "--workers", "1"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    predictions = pd.read_parquet(out / report["predictions"])
    assert {"image", "source", "label", "patient_id", "probability"} <= set(predictions.columns)
    assert set(predictions["label"]) == {"covid", "normal"} and report["overall"]["n_images"] == len(predictions)
    assert report["per_source"]["site_a"]["auc"]["estimate"] is not None and report["seen_unseen"]["seen_sources"] == []
    # the same numbers as the ONNX export of the same weights
    onnx = json.loads((root / "out" / "lungs" / "evaluation.json").read_text()) if (root / "out" / "lungs" / "evaluation.json").is_file() else None
    if onnx is not None:
        assert abs(onnx["overall"]["auc"]["estimate"] - report["overall"]["auc"]["estimate"]) < 1e-6

    # a rerun scores nothing again (same model file, same YAML)
    from covidcxr.evaluate import foreign_model as foreign

    monkeypatch.setattr(foreign.ForeignModel, "predict", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-scored")))
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    monkeypatch.undo()

    # with its training manifest: site_a's images are what it trained on; they and their patients are excluded, site_a is seen
    manifest = pd.read_csv(phantoms / "manifest.csv")
    training = manifest[manifest["source"] == "site_a"].assign(image=lambda f: [str(phantoms / p) for p in f["image"]], mask=lambda f: [str(phantoms / p) for p in f["mask"]])
    write_manifest(training, root / "models" / "training.csv")
    trained = write_yaml(root / "models", "lungs-trained", "lungs.pt", "histogram", format="torchscript", extra="training_manifest: training.csv\n")
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(phantoms), "--out", str(root / "out" / "trained"), "--json", "--n-boot", "50",
                                 "--cache-dir", str(root / "cache"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["training_data"]["known"] is True and report["training_sources"] == ["site_a"]
    assert "site_a" not in report["per_source"]
    excluded = pd.read_csv(root / "out" / "trained" / "excluded.csv")
    assert (excluded.loc[excluded["source"] == "site_a", "reason"] != "").all()
    assert set(training["image"]) <= set(excluded["image"])


def test_foreign_commands_refuse_bad_combinations(setting, tmp_path) -> None:
    from covidcxr.errors import CovidCXRError

    root, phantoms, yamls = setting
    for command, needle in (
        (["evaluate", "--model", str(yamls["lungs"])], "--data"),
        (["evaluate", str(root), "--model", str(yamls["lungs"]), "--data", str(phantoms)], "not both"),
        (["audit", "--model", str(yamls["lungs"]), "--data", str(phantoms), "--name", "x"], "--out"),
        (["evaluate", "--model", str(tmp_path / "none.yaml"), "--data", str(phantoms)], "no such file"),
    ):
        result = runner.invoke(app, command)
        assert isinstance(result.exception, CovidCXRError) and needle in str(result.exception), (command, result.output)
