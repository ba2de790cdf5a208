"""A cache at model resolution only: smaller entries, the same model input, QC says what it lacks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.synth import synthesize
from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.cache import load_cached, preprocess_collection
from covidcxr.preprocess.pipeline import PreprocessConfig
from covidcxr.preprocess.qc import write_qc

CONFIG = PreprocessConfig(lungs="mask", mask_source="manifest", size=(64, 64))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "collection"
    synthesize(root, n_images=8, size=160, seed=4)
    manifest = pd.read_csv(root / "manifest.csv")
    for column in ("image", "mask"):
        manifest[column] = [str(root / p) for p in manifest[column]]
    return manifest


def _entry_bytes(result) -> list[int]:
    return [(result.config_dir / f).stat().st_size for f in result.index["cache_file"]]


def test_model_only_entries_hold_the_same_model_input_in_fewer_bytes(phantoms, tmp_path):
    full = preprocess_collection(phantoms, CONFIG, tmp_path / "full", workers=1, progress=False)
    small = preprocess_collection(phantoms, CONFIG, tmp_path / "small", workers=1, progress=False, cache_mode="model_only")
    assert small.misses == 8 and small.rejected == []
    assert sum(_entry_bytes(small)) < 0.8 * sum(_entry_bytes(full))
    for key in small.index["cache_key"]:
        a, b = load_cached(tmp_path / "full", CONFIG, key), load_cached(tmp_path / "small", CONFIG, key)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
        assert a.qc_unavailable is None and a.qc_original is not None
        assert b.qc_original is None and b.qc_mask is None and "model_only" in b.qc_unavailable
    again = preprocess_collection(phantoms, CONFIG, tmp_path / "small", workers=1, progress=False, cache_mode="model_only")
    assert (again.hits, again.misses, again.rebuilt) == (8, 0, [])


def test_a_full_run_recomputes_model_only_entries_and_a_model_only_run_reuses_full_ones(phantoms, tmp_path):
    preprocess_collection(phantoms, CONFIG, tmp_path / "c", workers=1, progress=False, cache_mode="model_only")
    full = preprocess_collection(phantoms, CONFIG, tmp_path / "c", workers=1, progress=False)
    assert (full.hits, full.misses, full.rebuilt) == (0, 8, [])  # a miss, not damage
    assert load_cached(tmp_path / "c", CONFIG, full.index.loc[0, "cache_key"]).qc_unavailable is None
    reused = preprocess_collection(phantoms, CONFIG, tmp_path / "c", workers=1, progress=False, cache_mode="model_only")
    assert (reused.hits, reused.misses) == (8, 0)


def test_qc_of_a_model_only_cache_says_what_is_unavailable(phantoms, tmp_path):
    result = preprocess_collection(phantoms, CONFIG, tmp_path / "c", workers=1, progress=False, cache_mode="model_only")
    paths = write_qc(result.index, result.config_dir, sample=4)
    table = pd.read_csv(paths["qc_csv"])
    assert table["lung_height_ratio"].isna().all() and not table["possible_opacity_cut"].any()
    assert table["qc_unavailable"].str.contains("model_only").all()
    findings = json.loads(paths["findings"].read_text())["possible_opacity_cut"]
    assert findings["unavailable"]["n_images"] == 8 and "model_only" in findings["unavailable"]["reason"]
    assert findings["per_source_label"] == {}
    assert paths["contact_sheet"].stat().st_size > 0


def test_an_unknown_cache_mode_is_an_error(phantoms, tmp_path):
    with pytest.raises(CovidCXRError, match="model_only"):
        preprocess_collection(phantoms, CONFIG, tmp_path / "c", workers=1, progress=False, cache_mode="qc_only")
