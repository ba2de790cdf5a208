"""`LoadedRun.predict_files` / `predict_array`: new images through the run's own preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import covidcxr
from covidcxr.errors import CovidCXRError
from covidcxr.io import read_image
from covidcxr.train import recipe_from_mapping, train_recipe
from generated_data import tiny_train_recipe


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("predict")
    # fp32 and a brisk learning rate: probabilities that differ from image to image
    recipe = tiny_train_recipe(root, "predict", train={"epochs": 2}, optimizer={"name": "adam", "lr": 0.02}, engine={"threads": 1, "progress_bar": False, "precision": "32"})
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    return covidcxr.load_run(result.run_dir)


@pytest.fixture(scope="module")
def test_images(run) -> pd.DataFrame:
    predictions = pd.read_parquet(run.run_dir / "predictions.parquet")
    return predictions[predictions["split"] == "test"].head(12).reset_index(drop=True)


def test_predict_files_reproduces_the_runs_own_predictions(run, test_images) -> None:
    table = run.predict_files(test_images["image"].tolist(), batch_size=5)
    assert table["image"].tolist() == test_images["image"].tolist()
    assert table["error"].isna().all() and table["threshold"].eq(run.threshold).all()
    expected = test_images["probability"].to_numpy()
    spread = float(expected.max() - expected.min())
    assert spread > 1e-3, "the images must get different probabilities for this test to tell preprocessings apart"
    # the recipe crops nothing (lungs: none), so the U-Net's mask at inference changes no pixel
    np.testing.assert_allclose(table["probability"].to_numpy(), expected, atol=0.02 * spread + 1e-6)
    decided = np.where(table["probability"] >= run.threshold, run.classes[1], run.classes[0])
    assert table["decision"].tolist() == decided.tolist()


def test_another_preprocessing_would_not_reproduce_them(run, test_images) -> None:
    """The check above can fail: without the run's equalisation the probabilities move."""
    expected = test_images["probability"].to_numpy()
    images = np.stack([read_image(p).pixels for p in test_images["image"]])  # native 64 px, not equalised
    raw = run.predict(images)
    assert np.abs(raw - expected).max() > 0.02 * float(expected.max() - expected.min())


def test_predict_array_equals_predict_files(run, test_images) -> None:
    paths = test_images["image"].tolist()[:4]
    from_files = run.predict_files(paths)
    from_arrays = run.predict_array([read_image(p).pixels for p in paths])
    assert from_arrays["image"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(from_arrays["probability"], from_files["probability"], atol=1e-6)
    assert from_arrays["decision"].tolist() == from_files["decision"].tolist()
    stacked = run.predict_array(np.stack([read_image(p).pixels for p in paths]))
    np.testing.assert_allclose(stacked["probability"], from_files["probability"], atol=1e-6)


def test_bad_inputs_are_named(run, test_images, tmp_path: Path) -> None:
    missing = tmp_path / "absent.png"
    with pytest.raises(CovidCXRError, match="absent.png"):
        run.predict_files([test_images["image"][0], missing])
    table = run.predict_files([test_images["image"][0], missing], on_error="record")
    assert table["error"].isna().tolist() == [True, False] and "absent.png" in table["error"][1]
    assert np.isnan(table["probability"][1]) and pd.isna(table["decision"][1]) and table["decision"][0] in run.classes
    with pytest.raises(CovidCXRError, match=r"image 1: image array: expected finite values in \[0, 1\]"):
        run.predict_array([read_image(test_images["image"][0]).pixels, np.full((64, 64), 255.0)])
    with pytest.raises(CovidCXRError, match="pass \\[image\\]"):
        run.predict_array(np.zeros((64, 64)))
    with pytest.raises(CovidCXRError, match="on_error"):
        run.predict_files([], on_error="skip")
