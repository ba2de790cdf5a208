"""Lightning loggers (CSV always, TensorBoard, MLflow file store) and what each checkpoint keeps (output.keep)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from covidcxr.errors import CovidCXRError
from covidcxr.train import RunConflictError, recipe_from_mapping, train_recipe
from covidcxr.train.callbacks import keep_checkpoints
from covidcxr.train.inference import load_run
from covidcxr.train.run import check_tracking
from generated_data import tiny_train_recipe

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None


def _quiet(_: str) -> None:
    pass


def _train(recipe: dict):
    return train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture(scope="module")
def plain_run(root: Path):
    """A 2-epoch run with no tracking option: the CSV logger only."""
    return _train(tiny_train_recipe(root, "plain", train={"epochs": 2}))


def test_lightning_csv_logger_writes_beside_train_log(plain_run) -> None:
    run = plain_run.run_dir
    assert (run / "train_log.csv").is_file()  # the run's own table stays
    logged = pd.read_csv(run / "lightning_logs" / "metrics.csv")
    assert {"epoch", "val_loss", "val_auc"} <= set(logged.columns)
    assert sorted(logged["epoch"].dropna().astype(int).unique()) == [0, 1]
    hparams = yaml.safe_load((run / "lightning_logs" / "hparams.yaml").read_text())
    assert hparams["recipe"]["optimizer"]["lr"] == pytest.approx(0.003)
    assert not (run / "tensorboard").exists()


def test_best_is_weights_only_and_last_alone_carries_the_optimizer(plain_run) -> None:
    checkpoints = plain_run.run_dir / "checkpoints"
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best and "callbacks" not in best and "lr_schedulers" not in best
    assert best["state_dict"].keys() == last["state_dict"].keys() and "covidcxr" in best
    assert last["optimizer_states"] and "callbacks" in last
    assert (checkpoints / "best.ckpt").stat().st_size < (checkpoints / "last.ckpt").stat().st_size


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="tensorboard is not installed (pip install 'covidcxr[tracking]')")
@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed (pip install 'covidcxr[tracking]')")
def test_tensorboard_events_and_mlflow_file_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # MLflow 3 keeps its file store behind this switch (a database store needs nothing).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{root / 'mlruns'}"
    result = _train(tiny_train_recipe(root, "tracked", train={"epochs": 2}, output={"runs_dir": str(root / "runs"), "tensorboard": True, "mlflow": uri}))
    events = list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "TensorBoard event files are written into RUN/tensorboard/"
    accumulator = EventAccumulator(str(result.run_dir / "tensorboard"))
    accumulator.Reload()
    assert {"val_loss", "val_auc"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("val_loss")] and len(accumulator.Scalars("val_loss")) == 2

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == result.run_dir.name and run.info.status == "FINISHED"
    assert float(run.data.params["recipe/optimizer/lr"]) == pytest.approx(0.003)
    assert run.data.params["recipe/model/name"] == "conv8"
    assert {"val_loss", "val_auc"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    table = pd.read_csv(result.run_dir / "train_log.csv")  # the same numbers as the run's own log
    assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(table["val_loss"].tolist(), rel=1e-4)


def test_tracking_without_its_package_is_refused_before_training(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "mlflow") else real(name, *a))
    for output in ({"tensorboard": True}, {"mlflow": "file:/tmp/nowhere"}):
        recipe = recipe_from_mapping(tiny_train_recipe(root, "absent", output={"runs_dir": str(root / "runs"), **output}))
        with pytest.raises(CovidCXRError, match=r"covidcxr\[tracking\]"):
            check_tracking(recipe)
        with pytest.raises(CovidCXRError, match="not installed"):
            train_recipe(recipe, progress=False, say=_quiet)
    assert not (root / "runs" / "absent").exists(), "nothing is written before the refusal"


def test_keep_policies_on_a_finished_run(plain_run, tmp_path: Path) -> None:
    for keep, left in (("all", {"best.ckpt", "last.ckpt"}), ("best", {"best.ckpt"}), ("last", {"last.ckpt"})):
        copy = tmp_path / keep
        shutil.copytree(plain_run.run_dir, copy)
        removed = keep_checkpoints(copy, keep)
        assert {p.name for p in (copy / "checkpoints").glob("*.ckpt")} == left
        assert {p.name for p in removed} == {"best.ckpt", "last.ckpt"} - left
    assert load_run(tmp_path / "best").checkpoint.name == "best.ckpt"  # the model survives "best"
    with pytest.raises(CovidCXRError, match="best.ckpt is missing"):
        load_run(tmp_path / "last")  # "last" keeps no evaluated model, and says so
    assert load_run(tmp_path / "last", checkpoint="last").checkpoint.name == "last.ckpt"


def test_keep_refuses_an_unfinished_run(plain_run, tmp_path: Path) -> None:
    copy = tmp_path / "unfinished"
    shutil.copytree(plain_run.run_dir, copy)
    (copy / "metrics.json").unlink()
    with pytest.raises(CovidCXRError, match="not finished"):
        keep_checkpoints(copy, "best")
    assert (copy / "checkpoints" / "last.ckpt").is_file()


def test_output_keep_best_prunes_at_the_end_and_refuses_training_further(root: Path) -> None:
    recipe = tiny_train_recipe(root, "kept", output={"runs_dir": str(root / "runs"), "keep": "best"})
    result = _train(recipe)
    checkpoints = result.run_dir / "checkpoints"
    assert not (checkpoints / "last.ckpt").exists() and (checkpoints / "best.ckpt").is_file()
    assert result.metrics["status"] == "complete"
    metrics = load_run(result.run_dir).info  # the model loads from best.ckpt alone
    assert metrics["recipe"]["output"]["keep"] == "best"
    assert _train(recipe).status == "finished"  # the same recipe: nothing to do
    more = tiny_train_recipe(root, "kept", train={"epochs": 2}, output={"runs_dir": str(root / "runs"), "keep": "best"})
    with pytest.raises(RunConflictError, match="output.keep=best"):
        _train(more)
