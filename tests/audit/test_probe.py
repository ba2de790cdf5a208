import numpy as np
import pytest

from covidcxr.audit.probe import source_probe
from covidcxr.errors import CovidCXRError


def _embeddings(signal: float, n_per_source: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = np.repeat(["a", "b", "c"], n_per_source)
    x = rng.normal(size=(len(sources), 16))
    for k, name in enumerate("abc"):
        x[sources == name, k] += signal
    patients = np.array([f"{s}-{i // 2}" for i, s in enumerate(sources)])  # two images per patient
    return x, sources, patients


def test_probe_reads_a_strong_source_signal():
    x, sources, patients = _embeddings(signal=4.0)
    result = source_probe(x, sources, patients, n_boot=200)
    assert result["chance"] == pytest.approx(1 / 3)
    assert result["balanced_accuracy"]["estimate"] > 0.95
    assert result["balanced_accuracy"]["low"] > 0.85
    assert result["n_images"] == 120 and result["n_patients"] == 60 and result["n_sources"] == 3
    assert np.array(result["confusion"]).sum() == 120


def test_probe_is_at_chance_without_a_source_signal():
    x, sources, patients = _embeddings(signal=0.0)
    result = source_probe(x, sources, patients, n_boot=200)
    ba = result["balanced_accuracy"]
    # cross-validated probes without signal sit at or slightly below chance
    assert ba["low"] < 1 / 3
    assert ba["high"] < 1 / 3 + 0.1


def test_probe_skips_when_one_source_is_left():
    x, sources, patients = _embeddings(signal=1.0)
    sources = sources.astype("<U8")
    sources[sources == "c"] = "a"
    sources[:3] = "tiny"  # 3 images: below the minimum, reported as left out
    result = source_probe(x[sources != "b"], sources[sources != "b"], patients[sources != "b"])
    assert "skipped" in result and result["left_out"] == ["tiny"]


def test_probe_rejects_misaligned_inputs():
    x, sources, patients = _embeddings(signal=1.0)
    with pytest.raises(CovidCXRError, match="row-aligned"):
        source_probe(x[:-1], sources, patients)
