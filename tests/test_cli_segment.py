"""``covidcxr segment train`` / ``evaluate`` on tiny generated phantoms."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import CovidCXRError

runner = CliRunner()

REQUIRED = {"dice_mean", "iou_mean", "hd95_mean", "n", "per_source", "worst"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from covidcxr.data.synth import synthesize

    root = tmp_path_factory.mktemp("phantoms")
    synthesize(root, n_images=15, size=64, seed=5)
    return root


def test_train_then_evaluate_json_and_resume(phantoms, tmp_path):
    weights, run = tmp_path / "weights", tmp_path / "run"
    train = ["segment", "train", "--data", str(phantoms), "--out", str(weights), "--run-dir", str(run), "--size", "64", "--width", "4", "--batch-size", "4", "--no-progress"]
    result = runner.invoke(app, [*train, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert (weights / "lung_unet.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    metadata = json.loads((weights / "lung_unet.json").read_text())
    assert metadata["config"]["input_size"] == 64 and metadata["split"]["test"]
    assert set(metadata["metrics"]["test"]) >= REQUIRED

    # default: only the images the weights never saw (the split's test patients)
    result = runner.invoke(app, ["segment", "evaluate", "--data", str(phantoms), "--weights", str(weights), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) >= REQUIRED
    assert summary["n"] == len(metadata["split"]["test"]) and summary["excluded_seen"] == 15 - summary["n"]
    for stats in summary["per_source"].values():
        assert set(stats) >= {"dice_mean", "iou_mean", "hd95_mean", "n"}
    assert sum(s["n"] for s in summary["per_source"].values()) == summary["n"]
    assert 0 < len(summary["worst"]) <= 10 and {"image", "dice"} <= set(summary["worst"][0])
    # lung recall per label, with patient-bootstrap intervals and the n behind them
    assert 0.0 <= summary["recall_mean"] <= 1.0
    per_label = summary["recall_by_label"]["per_label"]
    assert sum(v["n_images"] for v in per_label.values()) == summary["n"]
    for stats in per_label.values():
        assert stats["ci"][0] <= stats["mean"] <= stats["ci"][1] and stats["n_patients"] <= stats["n_images"]

    result = runner.invoke(app, ["segment", "evaluate", "--data", str(phantoms), "--weights", str(weights), "--json", "--all"])
    assert json.loads(result.stdout)["n"] == 15

    # a second call with more epochs resumes from the run folder's last checkpoint
    result = runner.invoke(app, [*train, "--epochs", "2"])
    assert result.exit_code == 0, repr(result.exception)
    assert "resuming" in result.output
    assert json.loads((weights / "lung_unet.json").read_text())["training"]["epochs_run"] == 2


def test_evaluate_with_bad_weights_names_the_file(phantoms, tmp_path):
    missing = tmp_path / "absent.pt"
    result = runner.invoke(app, ["segment", "evaluate", "--data", str(phantoms), "--weights", str(missing)])
    assert result.exit_code != 0
    assert isinstance(result.exception, CovidCXRError) and str(missing) in str(result.exception)


def test_evaluate_tta_flags_select_the_path(phantoms):
    from covidcxr.preprocess.lungs import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"the shipped lung U-Net weights are not at {DEFAULT_WEIGHTS}")
    base = ["segment", "evaluate", "--data", str(phantoms), "--json", "--all", "--convention", "heart_excluded"]
    summaries = {}
    for flags, expected in (([], "none"), (["--no-tta"], "none"), (["--tta"], "multiscale"), (["--tta-preset", "multiscale3"], "multiscale3")):
        result = runner.invoke(app, [*base, *flags])
        assert result.exit_code == 0, result.output
        summaries[expected] = summary = json.loads(result.stdout)
        assert summary["tta"] == expected and summary["n"] == 15 and set(summary) >= REQUIRED
    assert summaries["none"]["dice_mean"] != summaries["multiscale"]["dice_mean"] or summaries["none"]["hd95_mean"] != summaries["multiscale"]["hd95_mean"]
    result = runner.invoke(app, [*base, "--tta-preset", "flips"])
    assert result.exit_code != 0 and "flips" in str(result.exception)


def test_coverage_needs_images_without_masks_and_says_so(phantoms):
    # every phantom has a reference mask: there is no unmasked image to compare
    result = runner.invoke(app, ["segment", "coverage", "--data", str(phantoms), "--json"])
    assert result.exit_code != 0
    assert isinstance(result.exception, CovidCXRError) and "without a lung mask" in str(result.exception)


def test_fine_tuning_with_opacities_and_the_recall_loss_starts_from_the_given_weights(phantoms, tmp_path):
    base = ["segment", "train", "--data", str(phantoms), "--size", "64", "--batch-size", "4", "--no-progress", "--epochs", "1"]
    first = tmp_path / "first"
    assert runner.invoke(app, [*base, "--width", "4", "--out", str(first), "--run-dir", str(tmp_path / "r1")]).exit_code == 0
    tuned = tmp_path / "tuned"
    options = ["--opacity-prob", "1.0", "--site-prob", "0.5", "--loss", "tversky_ce", "--init-weights", str(first / "lung_unet.pt")]
    result = runner.invoke(app, [*base, "--width", "4", "--out", str(tuned), "--run-dir", str(tmp_path / "r2"), *options])
    assert result.exit_code == 0, result.output
    assert "fine-tuning from" in result.output
    training = json.loads((tuned / "lung_unet.json").read_text())["training"]
    assert training["init_weights"] == str(first / "lung_unet.pt") and "Tversky" in training["loss"] and "RandLungOpacityd" in training["augmentation"]
    # weights of another architecture are refused, naming the file
    result = runner.invoke(app, [*base, "--width", "8", "--out", str(tmp_path / "x"), "--run-dir", str(tmp_path / "r3"), "--init-weights", str(first / "lung_unet.pt")])
    assert result.exit_code != 0 and str(first / "lung_unet.pt") in str(result.exception)
