"""The Predictor: same preprocessing as training, warnings, out-of-distribution reference, run discovery."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from covidcxr.errors import CovidCXRError
from covidcxr.io.writers import write_png
from covidcxr.preprocess.pipeline import load_segmenter, preprocess_image
from covidcxr.serve.checks import colour_fraction, segmentation_warnings
from covidcxr.serve.predictor import Predictor, default_run
from covidcxr.serve.reference import REFERENCE_FILE, EmbeddingReference
from generated_data import random_texture
from serve_fixtures import copy_run, png_bytes, split_images, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("predictor") / "run")


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return Predictor.load(run_dir)


def test_same_preprocessing_and_forward_pass_as_training(predictor: Predictor, run_dir: Path) -> None:
    image = split_images(run_dir, "test")[0]
    config = predictor.run.preprocess_config.model_copy(update={"mask_source": "model"})
    expected = predictor.run.predict(preprocess_image(image, config, load_segmenter()).image[None])[0]
    result = predictor.predict_file(image, gradcam=True)
    assert result.probability == pytest.approx(float(expected), abs=1e-6)
    assert result.segmentation["mask_source"] == "model"  # the run used manifest masks; uploads have none
    # Grad-CAM must leave the network as it was (BatchNorm in eval mode): same answer twice
    assert predictor.predict_file(image, gradcam=True).probability == result.probability
    assert not predictor.run.model.training


def test_negative_decisions_are_explained_too(predictor: Predictor, run_dir: Path) -> None:
    from covidcxr.audit.saliency import gradcam

    decided = {}
    for image in split_images(run_dir, "test"):
        result = predictor.predict_file(image)
        decided.setdefault(result.model_decision, (image, result))
    assert set(decided) == {"covid", "rest"}
    image, negative = decided["rest"]
    assert negative.probability < 0.5 and "negated logit" in negative.saliency["explains"]
    assert negative.saliency["lung_focus"] is not None  # a non-empty map
    assert negative.overlays["gradcam"][:8] == b"\x89PNG\r\n\x1a\n"
    # the positive-logit map of a confident negative has (almost) nothing to show
    config = predictor.run.preprocess_config.model_copy(update={"mask_source": "model"})
    model_input = preprocess_image(image, config, load_segmenter()).image[None]
    assert gradcam(predictor.run, model_input).sum() < gradcam(predictor._negative_run, model_input).sum()


def test_training_writes_the_reference(tmp_path_factory) -> None:
    """Built once at the end of training (RunDir.reference), not at the first request."""
    from covidcxr.rundir import RunDir

    trained = tiny_run(tmp_path_factory)
    assert RunDir(trained).reference == trained / REFERENCE_FILE
    assert RunDir(trained).reference.is_file()


def test_an_old_run_without_reference_builds_it_once_and_says_so(run_dir: Path, tmp_path: Path, capsys) -> None:
    old = copy_run(run_dir, tmp_path / "old")
    (old / REFERENCE_FILE).unlink()
    capsys.readouterr()
    first = Predictor.load(old, progress=True)
    said = capsys.readouterr().err
    assert "building the out-of-distribution reference" in said and "once" in said and "inference/reference.npz" in said
    assert first.reference is not None and (old / REFERENCE_FILE).is_file()
    Predictor.load(old, progress=True)
    assert "building" not in capsys.readouterr().err  # read, not rebuilt


def test_the_cache_and_predict_give_the_same_model_input(predictor: Predictor, run_dir: Path, tmp_path: Path) -> None:
    """One code path: the training cache's entry for a file is the tensor predict classifies (float16 apart)."""
    import pandas as pd
    from PIL import Image

    from covidcxr.preprocess.cache import preprocess_collection, read_entry

    large = tmp_path / "large.png"  # a phantom at 512 px: predict and the cache both downscale it first
    Image.open(split_images(run_dir, "test")[0]).resize((512, 512), Image.Resampling.BICUBIC).save(large)
    seen: list[np.ndarray] = []
    classify = predictor.classifier
    predictor.classifier = lambda images: (seen.append(np.array(images)), classify(images))[1]
    try:
        predictor.predict_file(large, gradcam=False)
    finally:
        predictor.classifier = classify
    manifest = pd.DataFrame({"image": [str(large)], "mask": [None], "source": ["x"], "label": ["covid"], "patient_id": ["p"]})
    result = preprocess_collection(manifest, predictor.config, tmp_path / "cache", workers=1, progress=False)
    entry = read_entry(result.config_dir / result.index["cache_file"].iloc[0])
    assert seen[0].shape == (1, *entry.image.shape)
    np.testing.assert_allclose(seen[0][0], entry.image.astype(np.float32), atol=2**-11)


def test_reference_is_stored_once_and_reused(predictor: Predictor, run_dir: Path) -> None:
    path = run_dir / REFERENCE_FILE
    assert path.is_file()
    stored = EmbeddingReference.load(path)
    assert stored.threshold == pytest.approx(predictor.reference.threshold)
    assert stored.calibration == "val_and_train_leave_one_out"
    assert stored.stage_sizes == predictor.torch_classifier.module.stage_sizes()
    n_train, n_val = len(split_images(run_dir, "train")), len(split_images(run_dir, "val"))
    assert len(stored.embeddings) == n_train and len(stored.calibration_scores) == n_train + n_val
    # about 1 % of the calibration images lie above the 99th-percentile threshold
    assert (stored.calibration_scores > stored.threshold).sum() <= 0.01 * (n_train + n_val) + 1
    modified = path.stat().st_mtime_ns
    time.sleep(0.01)
    Predictor.load(run_dir)
    assert path.stat().st_mtime_ns == modified  # reused, not rebuilt


def test_out_of_distribution_images_are_flagged(predictor: Predictor, run_dir: Path, tmp_path: Path) -> None:
    flags = [predictor.predict_file(p, gradcam=False).out_of_distribution["flagged"] for p in split_images(run_dir, "test")]
    assert np.mean(flags) <= 0.15, flags  # phantoms of the training sites: mostly in distribution
    texture = write_png(tmp_path / "texture.png", random_texture(np.random.default_rng(3), size=256))
    result = predictor.predict_file(texture, gradcam=False)
    assert result.out_of_distribution["flagged"]
    assert "out_of_distribution" in [w.code for w in result.warnings]
    assert result.out_of_distribution["nearest_training_sources"][0] in ("site_a", "site_b", "site_c")


def test_colour_marks_are_warned_and_photos_refused(predictor: Predictor, run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    grey = np.asarray(Image.open(split_images(run_dir, "test")[0]).convert("RGB").resize((256, 256))).copy()
    marked = grey.copy()
    marked[10:40, 10:80] = (255, 0, 0)  # a red annotation box: 3.2 % of the pixels
    assert colour_fraction(grey) == 0.0 and 0.03 < colour_fraction(marked) < 0.25
    path = tmp_path / "marked.png"
    path.write_bytes(png_bytes(marked))
    assert "colour_marks" in [w.code for w in predictor.predict_file(path, gradcam=False).warnings]


def test_segmentation_warnings_rules() -> None:
    assert segmentation_warnings(0.3, 0.5, None) == []
    assert segmentation_warnings(0.3, 0.5, "empty lung mask")[0].code == "segmentation_rejected"
    assert segmentation_warnings(0.02, 0.5, None)[0].code == "implausible_segmentation"
    assert "lateral" in segmentation_warnings(0.3, 0.95, None)[0].message
    assert segmentation_warnings(0.0, float("nan"), None)[0].code == "implausible_segmentation"


def test_low_resolution_and_unusual_aspect_are_warned(predictor: Predictor, tmp_path: Path, run_dir: Path) -> None:
    from covidcxr.io import read_image

    phantom = read_image(split_images(run_dir, "test")[0]).pixels  # 64 px
    path = write_png(tmp_path / "wide.png", np.concatenate([phantom, phantom], axis=1))  # 128 x 64: aspect 2
    codes = [w.code for w in predictor.predict_file(path, gradcam=False).warnings]
    assert "low_resolution" in codes and "unusual_aspect" in codes


def test_predict_bytes_uses_a_private_file(predictor: Predictor, run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = {}
    original = Predictor.predict_file

    def spy(self, path, gradcam=True):
        path = Path(path)
        seen.update(name=path.name, mode=path.stat().st_mode & 0o777, folder=path.parent, folder_mode=path.parent.stat().st_mode & 0o777)
        return original(self, path, gradcam)

    monkeypatch.setattr(Predictor, "predict_file", spy)
    data = Path(split_images(run_dir, "test")[0]).read_bytes()
    assert predictor.predict_bytes(data, gradcam=False).input.format == "png"
    assert seen["name"] == "upload" and seen["mode"] == 0o600 and seen["folder_mode"] == 0o700
    assert seen["folder"].parent == tmp_path and not seen["folder"].exists()  # removed afterwards


def test_default_run_discovery(tmp_path: Path, run_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CovidCXRError, match="no trained run found under .*runs.*make demo"):
        default_run()
    segmentation_run = tmp_path / "runs" / "lung_unet" / "checkpoints"
    segmentation_run.mkdir(parents=True)
    (segmentation_run / "best.ckpt").write_bytes(b"not a classifier")
    with pytest.raises(CovidCXRError, match="no trained run"):
        default_run()  # a checkpoint without config.yaml is not a classifier run
    copy_run(run_dir, tmp_path / "demo" / "mine")
    assert default_run() == Path("demo") / "mine"
    with pytest.raises(CovidCXRError, match="engine must be one of"):
        Predictor.load(run_dir, engine="tensorrt")


def test_decisions_binary_at_the_threshold_and_multiclass_by_argmax() -> None:
    from types import SimpleNamespace

    predictor = object.__new__(Predictor)  # only the decision rule, no network
    predictor.run = SimpleNamespace(binary=True, classes=["rest", "covid"], threshold=0.3)
    assert predictor._decide(np.float64(0.3))[:3] == (0.3, "covid", 0.3)
    probability, label, threshold, by_class = predictor._decide(np.float64(0.29))
    assert label == "rest" and by_class == pytest.approx({"rest": 0.71, "covid": 0.29})
    predictor.run = SimpleNamespace(binary=False, classes=["normal", "pneumonia", "covid"], threshold=0.5)
    probability, label, threshold, by_class = predictor._decide(np.array([0.2, 0.5, 0.3]))
    assert (probability, label, threshold) == (0.5, "pneumonia", None) and by_class["covid"] == 0.3


class _ShortLungSegmenter:
    """A segmenter whose right lung stops halfway down: what a mask that cut away a basal consolidation looks like."""

    def __init__(self, cut: float) -> None:
        self.cut = cut

    def segment_batch(self, images):
        masks = []
        for image in images:
            h, w = image.shape
            mask = np.zeros((h, w), bool)
            top, bottom = h // 8, h - h // 8
            mask[top:bottom, w // 10 : w // 2 - 2] = True
            mask[top : int(bottom - self.cut * (bottom - top)), w // 2 + 2 : w - w // 10] = True
            masks.append(mask)
        return masks


def test_a_mask_that_cut_a_lung_short_is_warned(predictor: Predictor, run_dir: Path, monkeypatch) -> None:
    image = split_images(run_dir, "test")[0]
    monkeypatch.setattr(predictor, "segmenter", _ShortLungSegmenter(cut=0.4))
    codes = [w.code for w in predictor.predict_file(image, gradcam=False).warnings]
    assert "possible_opacity_cut" in codes
    monkeypatch.setattr(predictor, "segmenter", _ShortLungSegmenter(cut=0.0))
    assert "possible_opacity_cut" not in [w.code for w in predictor.predict_file(image, gradcam=False).warnings]
