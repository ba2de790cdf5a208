"""The indexed near-duplicate search finds exactly the all-pairs pairs; fingerprints are cached."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from covidcxr.data import dedup
from covidcxr.data.dedup import (
    FingerprintCache,
    assign_dup_groups,
    fingerprint_images,
    interleave_bits,
    near_duplicate_pairs,
)
from covidcxr.data.synth import synthetic_fingerprints

from generated_data import random_texture


def _pairs(frame):
    return frame[["i", "j"]].to_numpy().tolist()


def test_index_finds_the_all_pairs_pairs_on_synthetic_fingerprints():
    prints, planted = synthetic_fingerprints(800, duplicate_share=0.04, seed=3)
    indexed = near_duplicate_pairs(prints, method="index")
    reference = near_duplicate_pairs(prints, method="all_pairs")
    assert _pairs(indexed) == _pairs(reference)
    assert indexed["hash_distance"].tolist() == reference["hash_distance"].tolist()
    np.testing.assert_allclose(indexed["correlation"], reference["correlation"], atol=1e-5)
    found = {tuple(p) for p in _pairs(indexed)}
    # the rule is not perfect on heavily re-windowed, noisy copies, but finds most
    assert sum(tuple(p) in found for p in planted.tolist()) >= 0.9 * len(planted)
    # both rules matter: some planted copies are further than 24 bits, found by correlation only
    assert (indexed["hash_distance"] > 24).any() and (indexed["hash_distance"] <= 24).any()


@pytest.mark.parametrize("rule", [(0, 0.99, 10), (40, 0.9, 60), (24, 0.97, 48)])
def test_index_matches_all_pairs_for_other_thresholds(rule):
    prints, _ = synthetic_fingerprints(600, duplicate_share=0.05, seed=5)
    # an unreadable image and a flat one take part in neither search
    valid = prints.valid.copy()
    valid[7] = False
    thumbnails = prints.thumbnails.copy()
    thumbnails[8] = 0
    prints = dedup.Fingerprints(prints.hashes, thumbnails, valid)
    assert _pairs(near_duplicate_pairs(prints, *rule, method="index")) == _pairs(near_duplicate_pairs(prints, *rule, method="all_pairs"))


def test_unknown_method_is_an_error():
    prints, _ = synthetic_fingerprints(10, duplicate_share=0.0)
    with pytest.raises(ValueError, match="all_pairs"):
        near_duplicate_pairs(prints, method="brute")


def test_interleave_bits_reorders_every_bit_once_and_keeps_distances():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, np.iinfo(np.uint64).max, (50, 4), dtype=np.uint64, endpoint=True)
    codes = interleave_bits(hashes, 13)
    assert codes.shape == (50, 32) and codes.dtype == np.uint8
    ones = np.bitwise_count(hashes).sum(axis=1)
    assert (np.bitwise_count(codes).sum(axis=1) == ones).all()
    # bit 1 of the hash goes to position 20 (after the 20 bits 0, 13, ..., 247 of the first substring)
    single = interleave_bits(np.array([[1 << 62, 0, 0, 0]], np.uint64), 13)
    assert np.unpackbits(single[0]).nonzero()[0].tolist() == [20]
    xor_before = np.bitwise_count(hashes[0] ^ hashes[1]).sum()
    assert np.bitwise_count(codes[0] ^ codes[1]).sum() == xor_before


def test_fingerprints_of_a_large_collection_are_memory_mapped(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for k in range(5):
        path = tmp_path / f"{k}.png"
        Image.fromarray((random_texture(rng, 64) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    in_memory, _ = fingerprint_images(paths, workers=1, show_progress=False, batch=2)
    mapped, _ = fingerprint_images(paths, workers=1, show_progress=False, batch=2, memmap_from=3)
    assert isinstance(mapped.thumbnails, np.memmap) and not isinstance(in_memory.thumbnails, np.memmap)
    assert mapped.thumbnails.dtype == np.uint8 and np.array_equal(mapped.thumbnails, in_memory.thumbnails)
    assert _pairs(near_duplicate_pairs(mapped, method="index")) == _pairs(near_duplicate_pairs(in_memory, method="all_pairs"))


def test_fingerprints_are_cached_and_refreshed_when_a_file_changes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        path = tmp_path / f"{k}.png"
        Image.fromarray((random_texture(rng, 64) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    paths.append(str(bad))
    cache_file = tmp_path / "cache" / "fingerprints.sqlite"
    first, rejected = fingerprint_images(paths, workers=1, show_progress=False, cache=cache_file)
    assert len(FingerprintCache(cache_file)) == 4 and [r.path for r in rejected] == [str(bad)]

    decoded: list[str] = []
    real = dedup._fingerprint_file
    monkeypatch.setattr(dedup, "_fingerprint_file", lambda path: decoded.append(path) or real(path))
    again, rejected_again = fingerprint_images(paths, workers=1, show_progress=False, cache=cache_file)
    assert decoded == []  # every fingerprint, and the unreadable file's reason, came from the cache
    assert rejected_again == rejected
    assert (again.hashes == first.hashes).all() and np.array_equal(again.thumbnails, first.thumbnails)
    assert again.valid.tolist() == [True, True, True, False]

    Image.fromarray((random_texture(rng, 64) * 255).astype(np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(10**18, 10**18))
    changed, _ = fingerprint_images(paths, workers=1, show_progress=False, cache=cache_file)
    assert decoded == [paths[1]]
    assert not (changed.hashes[1] == first.hashes[1]).all()


@pytest.mark.shared_data
def test_index_gives_the_all_pairs_groups_on_the_shared_collection(shared_collection, tmp_path):
    from covidcxr.data.sources import load_source

    manifest = load_source(shared_collection).manifest.assign(dup_group=None)
    prints, rejected = fingerprint_images(manifest["image"].tolist(), workers=2, show_progress=False)
    assert rejected == []
    indexed = near_duplicate_pairs(prints, method="index")
    reference = near_duplicate_pairs(prints, method="all_pairs")
    assert _pairs(indexed) == _pairs(reference) and len(reference) > 0
    groups = assign_dup_groups(manifest, indexed)["dup_group"]
    assert groups.equals(assign_dup_groups(manifest, reference)["dup_group"])


def test_adapters_take_sha1_from_the_cache(tmp_path, monkeypatch):
    from covidcxr.data import manifest as manifest_module
    from covidcxr.data.sources import _common, load_source
    from covidcxr.data.sources._common import sha1_cache

    root = tmp_path / "chest_xray"
    for k, label in enumerate(["NORMAL", "PNEUMONIA"]):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), k * 50, np.uint8)).save(folder / f"person{k}_x.jpeg")
    cache = FingerprintCache(tmp_path / "fp.sqlite")
    with sha1_cache(cache):
        first = load_source(root).manifest
    hashed: list[str] = []
    real = manifest_module.file_sha1
    monkeypatch.setattr(dedup, "file_sha1", lambda path: hashed.append(str(path)) or real(path))
    monkeypatch.setattr(_common, "file_sha1", lambda path: hashed.append(str(path)) or real(path))
    with sha1_cache(cache):
        again = load_source(root).manifest
    assert hashed == [] and again["sha1"].tolist() == first["sha1"].tolist()
    assert first["sha1"].tolist() == [real(p) for p in first["image"]]


def test_a_group_larger_than_the_neighbours_asked_is_found_whole():
    # 12 copies of one thumbnail among 2,500 (more than the 8 neighbours first asked per image,
    # and more images than the 32 probed cells of ~64 hold): every one of the 66 pairs is a candidate
    prints, _ = synthetic_fingerprints(2500, duplicate_share=0.0, seed=7)
    thumbnails = np.array(prints.thumbnails)
    group = np.arange(100, 112)
    thumbnails[group] = thumbnails[100]
    i, j = dedup._thumbnail_candidates(thumbnails, np.arange(2500), 0.97)
    found = {(int(a), int(b)) for a, b in zip(i, j)}
    assert {(int(a), int(b)) for a in group for b in group if a < b} <= found
    assert all(a < b for a, b in found)
