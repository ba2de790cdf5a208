"""``covidcxr predict``, ``serve`` and ``export`` on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import CovidCXRError
from serve_fixtures import copy_run, split_images, tiny_run, write_text_as_png

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("cli") / "run")


def test_predict_json_writes_overlays_and_reports_every_failure(run_dir: Path, tmp_path: Path) -> None:
    good = split_images(run_dir, "test")[:2]
    bad = write_text_as_png(tmp_path / "notes.png")
    out = tmp_path / "overlays"
    result = runner.invoke(app, ["predict", *good, str(bad), "--run", str(run_dir), "--json", "--out", str(out)])
    assert result.exit_code == 1, result.output  # one refused image: reported, the others still done
    payload = json.loads(result.stdout)
    assert [item["image"] for item in payload] == [*good, str(bad)]
    for item in payload[:2]:
        assert 0 <= item["probability"] <= 1 and item["threshold"] == 0.5
        assert set(item["overlays"]) == {"input", "lung_mask", "gradcam"}
        assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in item["overlays"].values())
    assert payload[2]["error"] == "unsupported_media_type"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{Path(g).stem}.{kind}.png" for g in good for kind in ("input", "lungs", "gradcam")
    )


def test_predict_table_without_gradcam(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    import covidcxr.cli_serve

    monkeypatch.setattr(covidcxr.cli_serve, "console", Console(width=200))
    image = split_images(run_dir, "test")[0]
    result = runner.invoke(app, ["predict", image, "--run", str(run_dir), "--no-gradcam", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "NOT FOR MEDICAL USE" in result.output and "probability" in result.output and "decision" in result.output
    # the one-line model summary, and the abstention of a never-audited run, in words
    assert "model serve-tiny (conv8" in result.output and "synthetic phantoms — demo only" in result.output and "audit: never audited" in result.output
    assert "ABSTAIN" in result.output and "model_not_audited" in result.output and "not to be acted on" in result.output
    research = runner.invoke(app, ["predict", image, "--run", str(run_dir), "--no-gradcam", "--no-abstain", "--out", str(tmp_path)])
    assert research.exit_code == 0, research.output
    assert "abstention is OFF" in research.output and "would abstain" in research.output and "ABSTAIN " not in research.output
    assert not list(tmp_path.glob("*.gradcam.png")) and len(list(tmp_path.glob("*.lungs.png"))) == 1


class _CapturedServer:
    def __init__(self, captured: dict, **kwargs):
        captured.update(kwargs)

    def run(self) -> None:
        pass


def _capture_server(monkeypatch) -> dict:
    import covidcxr.serve.server

    captured: dict = {}
    monkeypatch.setattr(covidcxr.serve.server, "build_server", lambda app, host, port, limits: _CapturedServer(captured, app=app, host=host, port=port, limits=limits))
    return captured


def test_serve_builds_the_app_and_passes_settings(run_dir: Path, monkeypatch) -> None:
    captured = _capture_server(monkeypatch)
    monkeypatch.delenv("COVIDCXR_SERVE_TOKEN", raising=False)
    result = runner.invoke(app, ["serve", "--run", str(run_dir), "--port", "8765", "--token", "t0k", "--max-upload-mb", "3", "--header-timeout", "4", "--max-active", "3"])
    assert result.exit_code == 0, result.output
    assert captured["host"] == "127.0.0.1" and captured["port"] == 8765
    settings = captured["app"].state.settings
    assert settings.token == "t0k" and settings.max_upload_bytes == 3 * 1024 * 1024 and settings.max_active == 3
    assert captured["limits"].header_timeout == 4 and captured["limits"].body_timeout == settings.body_timeout == 60
    assert {route.path for route in captured["app"].routes} >= {"/", "/predict", "/model", "/health", "/openapi.json"}
    assert "visible to every user" in result.output  # a token on argv shows in ps: warned
    assert captured["app"].state.predictor.abstain is True
    research = runner.invoke(app, ["serve", "--run", str(run_dir), "--no-abstain"])
    assert research.exit_code == 0, research.output
    assert captured["app"].state.predictor.abstain is False and "abstention is OFF" in research.output


def test_serve_reads_the_token_from_a_file_or_the_environment(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    captured = _capture_server(monkeypatch)
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    secret.chmod(0o600)
    monkeypatch.setenv("COVIDCXR_SERVE_TOKEN", "from-the-env")
    result = runner.invoke(app, ["serve", "--run", str(run_dir), "--token-file", str(secret)])
    assert result.exit_code == 0, result.output
    assert captured["app"].state.settings.token == "from-a-file" and "visible" not in result.output and "readable by other" not in result.output
    result = runner.invoke(app, ["serve", "--run", str(run_dir)])
    assert result.exit_code == 0 and captured["app"].state.settings.token == "from-the-env"
    secret.chmod(0o644)
    result = runner.invoke(app, ["serve", "--run", str(run_dir), "--token-file", str(secret)])
    assert "readable by other users" in result.output
    secret.write_text("")
    result = runner.invoke(app, ["serve", "--run", str(run_dir), "--token-file", str(secret)])
    assert isinstance(result.exception, CovidCXRError) and str(secret) in str(result.exception)
    result = runner.invoke(app, ["serve", "--run", str(run_dir), "--token-file", str(tmp_path / "absent")])
    assert isinstance(result.exception, CovidCXRError) and "cannot read" in str(result.exception)


def test_serve_says_clearly_when_there_is_no_run(tmp_path: Path, monkeypatch) -> None:
    import covidcxr.zoo as zoo

    monkeypatch.chdir(tmp_path)  # no run named: the shipped 'covid' model, here absent from the installation
    monkeypatch.setitem(zoo.REGISTRY, "covid", zoo.ShippedModel("covid", "covid_vs_rest", "-", "recipes/shipped_covid.yaml", tmp_path / "absent"))
    result = runner.invoke(app, ["serve"])
    assert isinstance(result.exception, CovidCXRError)
    assert "shipped model 'covid' is not in this installation" in str(result.exception)
    assert "python -m covidcxr.zoo.package recipes/shipped_covid.yaml covid" in str(result.exception)


def test_bad_usage_is_one_clear_error(run_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "covidcxr", "export", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--onnx" in proc.stderr and "Traceback" not in proc.stderr
    result = runner.invoke(app, ["predict", "x.png", "--run", str(run_dir), "--engine", "onnx"])
    assert isinstance(result.exception, CovidCXRError) and "covidcxr export" in str(result.exception)


def test_predict_batch_csv_reports_every_file_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np
    import pandas as pd
    from PIL import Image

    folder = tmp_path / "incoming"
    (folder / "ward" / "deep").mkdir(parents=True)
    good = split_images(run_dir, "test")[:2]
    shutil.copy(good[0], folder / "ward" / "IM0001")  # extension-less: read by content
    shutil.copy(good[1], folder / "ward" / "deep" / "b.png")
    write_text_as_png(folder / "notes.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    csv = tmp_path / "out.csv"
    overlays = tmp_path / "overlays"
    result = runner.invoke(app, ["predict", str(folder), "--run", str(run_dir), "--csv", str(csv), "--out", str(overlays)])
    assert result.exit_code == 0, result.output
    assert "4 files, 2 predicted, 2 refused" in " ".join(result.output.split())
    assert not overlays.exists()  # no overlay PNGs in batch mode unless asked
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("image")
    assert sorted(Path(p).name for p in rows.index) == ["IM0001", "b.png", "notes.png", "photo.jpg"]
    predicted = rows[rows["status"] == "predicted"]
    assert sorted(Path(p).name for p in predicted.index) == ["IM0001", "b.png"]
    assert predicted["probability"].astype(float).between(0, 1).all() and predicted["model_decision"].isin(["covid", "rest"]).all()
    assert (predicted["decision"] == "abstain").all() and (predicted["abstain_reasons"] == "model_not_audited").all()
    assert predicted["abstain_detail"].str.contains("never audited").all() and (predicted["abstention"] == "on").all()
    refused = rows[rows["status"] == "refused"]
    assert refused.loc[str(folder / "notes.png"), "error"] == "unsupported_media_type"
    assert refused.loc[str(folder / "photo.jpg"), "error"] == "not_a_chest_xray" and "colour" in refused.loc[str(folder / "photo.jpg"), "detail"]
    # a rerun predicts nothing again; a changed file is predicted anew
    shutil.copy(good[0], folder / "ward" / "deep" / "b.png")
    again = runner.invoke(app, ["predict", str(folder), "--run", str(run_dir), "--csv", str(csv), "--json"])
    assert again.exit_code == 0, again.output
    assert [Path(item["image"]).name for item in json.loads(again.stdout)] == ["b.png"]
    assert len(pd.read_csv(csv)) == 4
    # with abstention off the decisions differ, so nothing predicted is reused
    research = runner.invoke(app, ["predict", str(folder), "--run", str(run_dir), "--csv", str(csv), "--json", "--no-abstain"])
    assert research.exit_code == 0, research.output
    assert sorted(Path(item["image"]).name for item in json.loads(research.stdout)) == ["IM0001", "b.png"]
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    predicted = rows[rows["status"] == "predicted"]
    assert (predicted["decision"] == predicted["model_decision"]).all() and (predicted["abstention"] == "off").all()
