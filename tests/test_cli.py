from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data.manifest import read_manifest, write_manifest

runner = CliRunner()


def _collection(tmp_path, tiny_manifest):
    write_manifest(tiny_manifest, tmp_path / "manifest.csv")
    return tmp_path


def test_summarize_json_counts(tmp_path, tiny_manifest):
    root = _collection(tmp_path, tiny_manifest)
    result = runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 88 and summary["patients"] == 44
    assert summary["by_source"]["site_a"] == {"covid": 20, "pneumonia": 12, "normal": 16, "other": 0}
    assert summary["with_mask"] == 0 and summary["duplicate_groups"] == 0 and summary["unreadable"] == []


def test_summarize_lists_unreadable_files(tmp_path, tiny_manifest):
    root = _collection(tmp_path, tiny_manifest)
    broken = tiny_manifest.loc[3, "image"]
    with open(broken, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    result = runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1"])
    summary = json.loads(result.stdout)
    assert [item["path"] for item in summary["unreadable"]] == [broken]
    assert broken in summary["unreadable"][0]["reason"]


def test_summarize_public_layout_is_detected(tmp_path):
    """A Kermany-style tree (no manifest.csv) is recognised and summarised."""
    from generated_data import random_texture

    from covidcxr.io import write_png

    rng = np.random.default_rng(0)
    names = {
        "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0117-0001.jpeg"],
        "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_6.jpeg"],
        "test/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
        "test/PNEUMONIA": ["person99_virus_183.jpeg"],
    }
    for folder, files in names.items():
        for name in files:
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            write_png(tmp_path / folder / name, random_texture(rng))  # PNG bytes: content, not extension, decides
    result = runner.invoke(app, ["data", "summarize", str(tmp_path), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["adapter"] == "kermany"
    assert summary["by_source"] == {"kermany": {"covid": 0, "pneumonia": 4, "normal": 3, "other": 0}}
    assert summary["patients"] == 6 and summary["unreadable"] == []  # person1 has two films


def test_summarize_shared_collection_matches_manifest(shared_collection):
    result = runner.invoke(app, ["data", "summarize", str(shared_collection), "--json", "--workers", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = pd.read_csv(shared_collection / "manifest.csv")
    assert summary["images"] == len(expected)
    assert summary["patients"] == expected["patient_id"].nunique()
    for (source, label), count in expected.groupby(["source", "label"]).size().items():
        assert summary["by_source"][source][label] == count
    assert summary["with_mask"] == int(expected["mask"].notna().sum())
    assert summary["unreadable"] == []
    assert summary["duplicate_groups"] >= expected["dup_group"].nunique() - 2


def test_split_command_writes_a_patient_disjoint_split(tmp_path, tiny_manifest):
    root = _collection(tmp_path, tiny_manifest)
    out = tmp_path / "split.csv"
    result = runner.invoke(app, ["data", "split", str(root / "manifest.csv"), "--out", str(out), "--scheme", "kfold", "--folds", "4"])
    assert result.exit_code == 0, result.output
    split = read_manifest(out)
    assert split["fold"].nunique() == 4
    assert (split.groupby("patient_id")["fold"].nunique() == 1).all()


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    completed = subprocess.run(
        [sys.executable, "-m", "covidcxr", "data", "summarize", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert "is not a directory" in completed.stderr and str(missing) in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("scheme", ["loso"])
def test_loso_needs_a_test_source(tmp_path, tiny_manifest, scheme):
    root = _collection(tmp_path, tiny_manifest)
    result = runner.invoke(app, ["data", "split", str(root), "--out", str(tmp_path / "s.csv"), "--scheme", scheme])
    assert result.exit_code != 0
    assert "--test-source" in str(result.exception)


def test_demo_refuses_a_missing_collection(tmp_path):
    # the journey itself runs in tests/test_demo.py (tiny recipes); here: the CLI's guard
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert "is not a folder" in str(result.exception) or "is not a folder" in result.output

def test_summarize_and_manifest_reuse_cached_fingerprints(tmp_path, tiny_manifest, monkeypatch):
    from covidcxr.data import dedup

    root = _collection(tmp_path, tiny_manifest)
    monkeypatch.setenv("COVIDCXR_CACHE_DIR", str(tmp_path / "cache"))
    first = runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1"])
    assert first.exit_code == 0, first.output
    assert len(dedup.FingerprintCache(tmp_path / "cache" / "fingerprints.sqlite")) == 88

    decoded: list[str] = []
    real = dedup._fingerprint_file
    monkeypatch.setattr(dedup, "_fingerprint_file", lambda path: decoded.append(path) or real(path))
    again = runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1"])
    assert json.loads(again.stdout) == json.loads(first.stdout) and decoded == []
    out = tmp_path / "m.csv"
    assert runner.invoke(app, ["data", "manifest", str(root), "--out", str(out), "--workers", "1"]).exit_code == 0
    assert decoded == [] and len(read_manifest(out)) == 88
    # --no-cache decodes every image again
    runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1", "--no-cache"])
    assert len(decoded) == 88


def test_split_of_a_folder_reuses_cached_fingerprints(tmp_path, tiny_manifest, monkeypatch):
    from covidcxr.data import dedup

    root = _collection(tmp_path, tiny_manifest)
    monkeypatch.setenv("COVIDCXR_CACHE_DIR", str(tmp_path / "cache"))
    assert runner.invoke(app, ["data", "summarize", str(root), "--json", "--workers", "1"]).exit_code == 0
    decoded: list[str] = []
    real = dedup._fingerprint_file
    monkeypatch.setattr(dedup, "_fingerprint_file", lambda path: decoded.append(path) or real(path))
    out = tmp_path / "split.csv"
    result = runner.invoke(app, ["data", "split", str(root), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert decoded == [] and len(read_manifest(out)) == 88
