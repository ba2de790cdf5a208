"""The preprocessing cache: hits, identical arrays, resuming, bad input, keys, layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.synth import synthesize
from covidcxr.preprocess.cache import (
    CacheMiss,
    config_dir,
    load_cached,
    preprocess_collection,
    read_index,
)
from covidcxr.preprocess.pipeline import PreprocessConfig, preprocess_image

CONFIG = PreprocessConfig(lungs="crop", mask_source="manifest", size=(64, 80))


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "collection"
    synthesize(root, n_images=20, size=72, seed=2)
    return root


@pytest.fixture()
def phantoms(phantom_source, tmp_path):
    """A private copy (tests corrupt files) and its manifest with absolute paths."""
    root = tmp_path / "collection"
    shutil.copytree(phantom_source, root)
    manifest = pd.read_csv(root / "manifest.csv")
    for column in ("image", "mask"):
        manifest[column] = [str(root / p) for p in manifest[column]]
    return manifest


class HalfSegmenter:
    """Picklable stand-in for the U-Net: the central block, split in two 'lungs'."""

    def segment_batch(self, images):
        masks = []
        for image in images:
            h, w = image.shape
            mask = np.zeros((h, w), bool)
            mask[h // 5 : 4 * h // 5, w // 6 : w // 2 - 2] = True
            mask[h // 5 : 4 * h // 5, w // 2 + 2 : 5 * w // 6] = True
            masks.append(mask)
        return masks


def test_second_run_is_all_hits_with_identical_arrays(phantoms, tmp_path):
    first = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert (first.hits, first.misses, first.errors, first.rejected) == (0, 20, 0, [])
    second = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert (second.hits, second.misses) == (20, 0)
    assert set(second.index["cache_status"]) == {"hit"}
    columns = ["cache_key", "cache_file", "mask_area_fraction", "left_right_balance", "crop_top", "crop_right"]
    pd.testing.assert_frame_equal(first.index[columns], second.index[columns])
    for row in second.index.itertuples():
        cached = load_cached(tmp_path / "cache", CONFIG, row.cache_key)
        again = load_cached(tmp_path / "cache", CONFIG, row.cache_key)
        np.testing.assert_array_equal(cached.image, again.image)
        assert cached.image.dtype == np.float32 and cached.image.shape == (64, 80)
        assert cached.lung_mask.dtype == bool and cached.meta["file_sha1"] == row.file_sha1
    # and the cached arrays are what the pipeline computes, up to float16 storage
    row = second.index.iloc[0]
    direct = preprocess_image(row["image"], CONFIG, manifest_mask=row["mask"])
    cached = load_cached(tmp_path / "cache", CONFIG, row["cache_key"])
    np.testing.assert_allclose(cached.image, direct.image, atol=2.5e-4)
    np.testing.assert_array_equal(cached.lung_mask, direct.lung_mask)


def test_parallel_workers_give_the_same_entries(phantoms, tmp_path):
    one = preprocess_collection(phantoms, CONFIG, tmp_path / "a", workers=1, progress=False, batch_size=4)
    two = preprocess_collection(phantoms, CONFIG, tmp_path / "b", workers=2, progress=False, batch_size=4)
    assert two.misses == 20 and list(one.index["cache_key"]) == list(two.index["cache_key"])
    for key in one.index["cache_key"]:
        np.testing.assert_array_equal(load_cached(tmp_path / "a", CONFIG, key).image, load_cached(tmp_path / "b", CONFIG, key).image)


def test_an_interrupted_run_resumes_computing_only_the_missing(phantoms, tmp_path):
    half = preprocess_collection(phantoms.iloc[:10], CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert half.misses == 10
    full = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert (full.hits, full.misses) == (10, 10)
    assert list(full.index["cache_status"]) == ["hit"] * 10 + ["miss"] * 10


class CrashingSegmenter(HalfSegmenter):
    """Works for one batch, then dies like a bug or a kill would stop the run."""

    def __init__(self):
        self.batches = 0

    def segment_batch(self, images):
        self.batches += 1
        if self.batches > 1:
            raise RuntimeError("simulated crash")
        return super().segment_batch(images)


def test_a_crashed_run_keeps_its_finished_entries(phantoms, tmp_path):
    config = PreprocessConfig(lungs="crop", mask_source="model", size=64)
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess_collection(phantoms, config, tmp_path / "cache", workers=1, progress=False, segmenter=CrashingSegmenter(), batch_size=4)
    resumed = preprocess_collection(phantoms, config, tmp_path / "cache", workers=1, progress=False, segmenter=HalfSegmenter(), batch_size=4)
    assert (resumed.hits, resumed.misses) == (4, 16)


def test_unreadable_image_is_rejected_with_its_reason_and_the_rest_processed(phantoms, tmp_path):
    broken = phantoms.loc[3, "image"]
    with open(broken, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    missing = phantoms.loc[7, "image"]
    shutil.move(missing, missing + ".gone")
    result = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=2, progress=False)
    assert (result.misses, result.errors) == (18, 2)
    reasons = {r.path: r.reason for r in result.rejected}
    assert set(reasons) == {broken, missing}
    assert broken in reasons[broken] and "does not exist" in reasons[missing]
    assert result.index.loc[3, "cache_status"] == "error" and pd.isna(result.index.loc[3, "cache_file"])


def test_rejected_crops_are_cached_with_their_reason(phantoms, tmp_path):
    tiny = phantoms.loc[0, "mask"]
    mask = np.zeros((72, 72), np.uint8)
    mask[30:40, 30:40] = 255
    from covidcxr.io import write_png

    write_png(tiny, mask)
    result = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert len(result.rejected) == 1 and "too small" in result.rejected[0].reason
    assert result.index.loc[0, "rejected_reason"] == result.rejected[0].reason
    cached = load_cached(tmp_path / "cache", CONFIG, result.index.loc[0, "cache_key"])
    assert "too small" in cached.rejected_reason
    again = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert again.hits == 20 and len(again.rejected) == 1


def test_an_edited_manifest_mask_is_a_miss(phantoms, tmp_path):
    preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    mask_path = phantoms.loc[5, "mask"]
    from covidcxr.io import read_mask, write_png

    mask = read_mask(mask_path)
    mask[:, :2] = False
    mask[0, 40] = True  # a changed pixel: same image, new mask
    write_png(mask_path, mask)
    again = preprocess_collection(phantoms, CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert (again.hits, again.misses) == (19, 1) and again.index.loc[5, "cache_status"] == "miss"


def test_model_masks_are_keyed_by_the_image_bytes(phantoms, tmp_path):
    config = PreprocessConfig(lungs="mask", mask_source="model", blur_radius=0, size=64)
    result = preprocess_collection(phantoms.iloc[:6], config, tmp_path / "cache", workers=2, progress=False, segmenter=HalfSegmenter())
    assert result.misses == 6 and set(result.index["mask_used"]) == {"model"}
    assert list(result.index["cache_key"]) == list(result.index["file_sha1"])
    cached = load_cached(tmp_path / "cache", config, result.index.loc[0, "file_sha1"])
    assert np.all(cached.image[~cached.lung_mask] == 0.0)


def test_layout_config_files_and_index(phantoms, tmp_path):
    result = preprocess_collection(phantoms.iloc[:4], CONFIG, tmp_path / "cache", workers=1, progress=False)
    directory = config_dir(tmp_path / "cache", CONFIG)
    assert result.config_dir == directory and directory.name == CONFIG.config_hash()[:16]
    saved = json.loads((directory / "config.json").read_text())
    assert saved["config_hash"] == CONFIG.config_hash() and PreprocessConfig(**saved["config"]) == CONFIG
    assert PreprocessConfig.from_yaml(directory / "config.yaml") == CONFIG
    key = result.index.loc[0, "cache_key"]
    assert (directory / key[:2] / f"{key}.npz").is_file()
    index = read_index(tmp_path / "cache", CONFIG)
    assert list(index["image"]) == list(phantoms["image"][:4]) and "mask_area_fraction" in index.columns
    assert not list(directory.rglob(".*.tmp*"))  # atomic writes leave no temporary files
    with pytest.raises(CacheMiss):
        load_cached(tmp_path / "cache", CONFIG, "0" * 40)
    with pytest.raises(CacheMiss):
        load_cached(tmp_path / "cache", PreprocessConfig(lungs="none", mask_source="manifest"), key)


def test_a_damaged_entry_is_recomputed(phantoms, tmp_path):
    first = preprocess_collection(phantoms.iloc[:3], CONFIG, tmp_path / "cache", workers=1, progress=False)
    entry = first.config_dir / first.index.loc[1, "cache_file"]
    entry.write_bytes(b"not a zip")
    again = preprocess_collection(phantoms.iloc[:3], CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert list(again.index["cache_status"]) == ["hit", "miss", "hit"]
    assert load_cached(tmp_path / "cache", CONFIG, first.index.loc[1, "cache_key"]).image.shape == (64, 80)


def test_the_real_segmenter_class_plugs_in_through_weights_on_disk(phantoms, tmp_path):
    # An untrained, tiny U-Net saved as weights: checks the seam (LungSegmenter.load by
    # path in each worker, batched segment_batch, masks at each image's size), not quality.
    lungs = pytest.importorskip("covidcxr.preprocess.lungs")
    import torch

    torch.manual_seed(0)
    net_config = lungs.SegmenterConfig(input_size=32, channels=(4, 8), strides=(2,), num_res_units=0)
    weights = lungs.save_weights(lungs.build_unet(net_config), net_config, tmp_path / "tiny.pt")
    config = PreprocessConfig(lungs="none", mask_source="model", size=48, segmenter_weights=str(weights))
    one = preprocess_collection(phantoms.iloc[:6], config, tmp_path / "a", workers=1, progress=False)
    two = preprocess_collection(phantoms.iloc[:6], config, tmp_path / "b", workers=2, progress=False, batch_size=3)
    assert one.misses == two.misses == 6 and set(two.index["mask_used"]) == {"model"}
    for key in one.index["cache_key"]:
        a, b = load_cached(tmp_path / "a", config, key), load_cached(tmp_path / "b", config, key)
        assert a.lung_mask.shape == (48, 48)
        np.testing.assert_array_equal(a.lung_mask, b.lung_mask)


def test_non_radiographs_are_refused_for_training_with_the_reason(phantoms, tmp_path):
    """A colour photograph, a test pattern and a blank frame never reach the cache (one shared check)."""
    from PIL import Image

    from covidcxr.io.writers import write_png

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(photo)
    pattern = tmp_path / "pattern.png"
    write_png(pattern, np.repeat(np.arange(8) / 7, 12)[None].repeat(96, axis=0).astype(np.float32))
    blank = tmp_path / "blank.png"
    write_png(blank, np.full((96, 96), 0.4, np.float32))
    bad = phantoms.iloc[:3].copy()
    bad["image"] = [str(photo), str(pattern), str(blank)]
    bad["mask"] = None
    manifest = pd.concat([phantoms, bad], ignore_index=True)
    config = PreprocessConfig(lungs="none", mask_source="auto", size=(64, 80))
    result = preprocess_collection(manifest, config, tmp_path / "cache", workers=1, progress=False, segmenter=HalfSegmenter())
    reasons = {r.path: r.reason for r in result.rejected}
    assert set(reasons) == {str(photo), str(pattern), str(blank)}
    assert "colour image" in reasons[str(photo)]
    assert "distinct grey levels" in reasons[str(pattern)]
    assert "blank" in reasons[str(blank)]
    index = result.index.set_index("image")
    assert set(index.loc[[str(photo), str(pattern), str(blank)], "cache_status"]) == {"error"}
    assert (index["cache_status"] == "miss").sum() == len(phantoms)  # every phantom passes the screening
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b""), id="empty"),  # what a power loss before fsync leaves
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), id="truncated"),
    ],
)
def test_an_empty_or_truncated_entry_is_named_and_rebuilt(phantoms, tmp_path, damage, caplog):
    first = preprocess_collection(phantoms.iloc[:3], CONFIG, tmp_path / "cache", workers=1, progress=False)
    entry = first.config_dir / first.index.loc[2, "cache_file"]
    damage(entry)
    with pytest.raises(CacheMiss, match=str(entry)):  # training reading it names the file (not "Aborted.")
        load_cached(tmp_path / "cache", CONFIG, first.index.loc[2, "cache_key"])
    with caplog.at_level("WARNING", logger="covidcxr.preprocess"):
        again = preprocess_collection(phantoms.iloc[:3], CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert list(again.index["cache_status"]) == ["hit", "hit", "miss"]
    assert len(again.rebuilt) == 1 and str(entry) in again.rebuilt[0]
    assert str(entry) in caplog.text
    assert load_cached(tmp_path / "cache", CONFIG, first.index.loc[2, "cache_key"]).image.shape == (64, 80)
    third = preprocess_collection(phantoms.iloc[:3], CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert (third.hits, third.rebuilt) == (3, [])


def test_stale_temporary_entries_are_removed_and_fresh_ones_kept(phantoms, tmp_path):
    import os
    import time

    first = preprocess_collection(phantoms.iloc[:2], CONFIG, tmp_path / "cache", workers=1, progress=False)
    folder = (first.config_dir / first.index.loc[0, "cache_file"]).parent
    stale, fresh = folder / ".abc.k2j4_x9a.tmp.npz", folder / ".abd.q8w7e6r5.tmp.npz"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    again = preprocess_collection(phantoms.iloc[:2], CONFIG, tmp_path / "cache", workers=1, progress=False)
    assert again.stale_temps_removed == 1
    assert not stale.exists() and fresh.exists()


def test_cli_preprocess_with_an_empty_entry_says_so_instead_of_aborting(phantom_source, tmp_path):
    """The bug report: a 0-byte entry made every rerun print only 'Aborted.'."""
    from typer.testing import CliRunner

    from covidcxr.cli import app

    runner = CliRunner()
    command = ["preprocess", "--data", str(phantom_source), "--out", str(tmp_path / "cache"), "--lungs", "crop", "--mask-source", "manifest", "--size", "48", "--workers", "1"]
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    entry = next((tmp_path / "cache").rglob("*.npz"))
    entry.write_bytes(b"")
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "Aborted" not in again.output
    assert "damaged cache entries rebuilt" in again.output and entry.stat().st_size > 0
