"""``covidcxr evaluate RUN --data DIR``: a run scored on a new collection, linked images excluded, resumable.

One tiny run trained on two phantom sites (site_a, site_b); the new collections are (1) its
own phantom collection (train/val images must be excluded, site_c scored as unseen) and (2)
a hospital folder per class holding a byte copy of a training image, a re-encoded
near-copy of a validation image, a copy of that copy (its copy group goes with it) and
fresh images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.evaluate.external import evaluate_external, read_external
from covidcxr.io.image import read_image
from covidcxr.io.writers import write_png
from covidcxr.rundir import RunDir
from covidcxr.train.recipe import recipe_from_mapping
from covidcxr.train.data import synthetic_dir
from covidcxr.train.run import train_recipe
from generated_data import random_texture, tiny_train_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    recipe = tiny_train_recipe(root, name="two-sites", data={
        "synthetic": {"n_images": 90, "size": 64, "seed": 1},
        "task": "covid_vs_rest",
        "sources": ["site_a", "site_b"],
        "split": {"test_size": 0.3, "val_size": 0.25},
    })
    run_dir = train_recipe(recipe_from_mapping(recipe), progress=False).run_dir
    return root, run_dir, synthetic_dir(RunDir(run_dir).read_recipe())


def test_evaluate_on_its_own_collection_excludes_what_it_saw(trained) -> None:
    _, run_dir, collection = trained
    result = runner.invoke(app, ["evaluate", str(run_dir), "--data", str(collection), "--name", "phantoms", "--json", "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = run_dir / "external" / "phantoms"
    assert report["predictions"] == "predictions.parquet" and (out / "predictions.parquet").is_file()
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert {"image", "source", "label", "patient_id", "probability", "seen"} <= set(predictions.columns)
    assert set(predictions.loc[predictions["seen"], "source"]) == {"site_a", "site_b"}
    seen = RunDir(run_dir).seen()
    # no scored image is linked to what the run trained or validated on
    assert not predictions["image"].isin(seen.rows["image"]).any()
    assert not predictions["patient_id"].isin(seen.rows["patient_id"]).any()
    excluded = pd.read_csv(out / "excluded.csv")
    trainval = set(seen.rows["image"].astype(str))
    assert trainval <= set(excluded["image"].astype(str)), "every train/val image is excluded"
    assert (excluded["reason"].str.len() > 0).all()
    assert report["excluded"]["n"] == len(excluded)
    assert set(report["per_source"]) == {"site_a", "site_b", "site_c"}
    for source, m in report["per_source"].items():
        assert m["n_images"] == int((predictions["source"] == source).sum())
        assert m["n_patients"] == predictions.loc[predictions["source"] == source, "patient_id"].nunique()
        auc = m["auc"]
        assert auc is None or auc["low"] <= auc["estimate"] <= auc["high"]
    assert report["seen_unseen"]["seen_sources"] == ["site_a", "site_b"]
    assert report["seen_unseen"]["unseen_sources"] == ["site_c"]
    assert read_external(run_dir)["phantoms"]["name"] == "phantoms"


def _hospital(root: Path, run_dir: Path) -> dict[str, str]:
    """A labels.csv collection (the run reads masks from the manifest, so each image has one): a copy of
    a training image, a near-copy of a validation image and its copy, and 12 fresh images."""
    manifest = RunDir(run_dir).read_manifest()
    train = manifest[manifest["split"] == "train"].iloc[0]
    val = manifest[manifest["split"] == "val"].iloc[0]
    folder = root / "hospital"
    folder.mkdir(parents=True, exist_ok=True)
    label_of = lambda row: "covid" if row["label"] == "covid" else "normal"  # noqa: E731
    lines = ["path,label,mask"]
    shutil.copyfile(train["image"], folder / "copy_of_train.png")
    shutil.copyfile(train["mask"], folder / "copy_of_train_mask.png")
    lines.append(f"copy_of_train.png,{label_of(train)},copy_of_train_mask.png")
    near = np.clip(read_image(val["image"]).pixels * 0.98 + 0.01, 0, 1)  # re-encoded, brightness nudged
    write_png(folder / "near_val.png", near)
    shutil.copyfile(folder / "near_val.png", folder / "near_val_again.png")
    shutil.copyfile(val["mask"], folder / "near_val_mask.png")
    lines += [f"near_val.png,{label_of(val)},near_val_mask.png", f"near_val_again.png,{label_of(val)},near_val_mask.png"]
    rng = np.random.default_rng(7)
    fresh_mask = np.zeros((128, 128), np.float32)
    fresh_mask[24:104, 16:56] = fresh_mask[24:104, 72:112] = 1.0
    write_png(folder / "fresh_mask.png", fresh_mask)
    for i in range(12):
        write_png(folder / f"fresh_{i}.png", random_texture(rng, 128))
        lines.append(f"fresh_{i}.png,{'covid' if i % 2 else 'normal'},fresh_mask.png")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return {"copy": "copy_of_train.png", "near": "near_val.png", "near_again": "near_val_again.png"}


@pytest.fixture(scope="module")
def hospital(trained):
    root, run_dir, _ = trained
    return _hospital(root, run_dir)


def test_hospital_folder_copies_and_near_copies_excluded_with_reasons_and_resumed(trained, hospital) -> None:
    root, run_dir, collection = trained
    names = hospital
    report = evaluate_external(run_dir, root / "hospital", name="hospital", n_boot=50, chunk=5)
    out = run_dir / "external" / "hospital"
    excluded = pd.read_csv(out / "excluded.csv")
    reason = {Path(p).name: r for p, r in zip(excluded["image"], excluded["reason"])}
    assert reason[names["copy"]] == "byte-identical copy of a training/validation image"
    assert reason[names["near"]].startswith("near-duplicate of training/validation image")
    assert reason[names["near_again"]] in (reason[names["near"]], "same patient or copy group as an excluded image")
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == 12 and not predictions["image"].map(lambda p: Path(p).name).isin(list(names.values())).any()
    assert list(report["per_source"]) == ["hospital"] and report["per_source"]["hospital"]["n_images"] == 12
    assert report["seen_unseen"]["unseen_sources"] == ["hospital"]

    # a rerun scores nothing again: the flushed predictions are reused (same weights)
    import covidcxr.experiments.testsets as testsets

    calls = []
    original = testsets.predict_images
    testsets.predict_images = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = evaluate_external(run_dir, root / "hospital", name="hospital", n_boot=50, chunk=5)
    finally:
        testsets.predict_images = original
    assert calls == [] and again["per_source"] == report["per_source"]

    # an interrupted pass resumes: drop the last 5 scored images, rerun, only they are scored again
    with_missing = predictions.iloc[:7]
    with_missing.to_parquet(out / "predictions.parquet", index=False)
    resumed = evaluate_external(run_dir, root / "hospital", name="hospital", n_boot=50, chunk=5)
    assert resumed["per_source"]["hospital"]["n_images"] == 12
    np.testing.assert_allclose(
        pd.read_parquet(out / "predictions.parquet").set_index("image").loc[predictions["image"], "probability"].to_numpy(),
        predictions["probability"].to_numpy(), atol=1e-6,
    )


def test_audit_run_on_a_new_collection(trained, hospital) -> None:
    root, run_dir, _ = trained
    result = runner.invoke(app, ["audit", str(run_dir), "--data", str(root / "hospital"), "--name", "hospital", "--json", "--n-boot", "50", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    written = json.loads((run_dir / "external" / "hospital" / "audit" / "audit.json").read_text())
    assert written["verdict"] == report["verdict"] in ("no_skill", "shortcut", "warning", "ok")
    assert report["n_images"] == 12 and report["evaluation"]["per_source"]["hospital"]["n_images"] == 12
    assert report["ablation"]["original"]["n_images"] == 12 and "lungs_only" in report["ablation"]
    assert any(f["id"] == "skill" for f in report["findings"])
    assert "source_probe" in report["not_available"]
    assert read_external(run_dir)["hospital"]["audit"]["verdict"] == report["verdict"]


def test_evaluate_data_refuses_bad_input_with_a_sentence(trained, tmp_path) -> None:
    _, run_dir, _ = trained
    from covidcxr.errors import CovidCXRError

    result = runner.invoke(app, ["evaluate", str(run_dir), "--data", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, CovidCXRError) and "nowhere" in str(result.exception)
    result = runner.invoke(app, ["evaluate", str(run_dir), str(run_dir), "--data", str(tmp_path)])
    assert isinstance(result.exception, CovidCXRError) and "one run" in str(result.exception)


def test_report_shows_every_external_evaluation_and_the_grid(trained, hospital) -> None:
    from datetime import datetime

    from covidcxr.experiments.store import RunStore, experiments_table, metrics_table, runs_table
    from covidcxr.report.results import external_sections, grid_unseen_results

    root, run_dir, _ = trained
    if not (run_dir / "external" / "hospital" / "evaluation.json").is_file():
        evaluate_external(run_dir, root / "hospital", name="hospital", n_boot=50)
    sections = {s["name"]: s for s in external_sections(run_dir)}
    assert "hospital" in sections and sections["hospital"]["per_source"]["hospital"]["n_images"] == 12
    # a grid store beside the run (runs/experiments.sqlite) that knows it: its per-source rows are shown
    store = RunStore(f"sqlite:///{run_dir.parent / 'experiments.sqlite'}")
    now = datetime.now()
    with store.engine.begin() as conn:
        conn.execute(experiments_table.insert().values(id=1, name="grid", created_at=now, updated_at=now))
        conn.execute(runs_table.insert().values(id=1, experiment_id=1, key="p", kind="train", labels="{}", config_hash="h", config="", run_dir=str(run_dir), status="done", attempts=1, created_at=now))
        conn.execute(metrics_table.insert().values(run_id=1, test_source="site_c", scope="source", seen=False, n_images=30, n_patients=20, auc=0.61, auc_low=0.45, auc_high=0.75))
        conn.execute(metrics_table.insert().values(run_id=1, test_source="(unseen)", scope="unseen", seen=False, n_images=30, n_patients=20, auc=0.61, auc_low=0.45, auc_high=0.75))
    store.dispose()
    grid = grid_unseen_results(run_dir)
    assert grid["rows"] == [{"test_source": "site_c", "seen": False, "n_images": 30, "n_patients": 20, "auc": {"estimate": 0.61, "low": 0.45, "high": 0.75}, "note": None}]
    out = root / "report.html"
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(out), "--no-figure-files", "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "On another collection: hospital" in html
    assert "test on every source" in html and "site_c (unseen)" in html
    assert "byte-identical copy of a training/validation image" in html
    assert "Audit on this collection: verdict" in html


def test_near_copies_are_excluded_where_the_training_images_cannot_be_read(trained, hospital, tmp_path) -> None:
    """Training stores fingerprints of its images, so a run moved away from them (or a shipped model) still finds near-copies."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.evaluate.seen_prints import read_stored_fingerprints, rewrite_stored_paths

    root, run_dir, collection = trained
    seen = RunDir(run_dir).seen()
    paths, prints = read_stored_fingerprints(RunDir(run_dir).seen_fingerprints)  # written by train_recipe
    assert set(paths) == set(seen.rows["image"].astype(str)) and prints.thumbnails.shape == (len(paths), 1024)
    # the run as another machine sees it: its manifest names images that are not there
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("external"))
    gone = str(tmp_path / "not-here")
    manifest = RunDir(moved).read_manifest()
    for column in ("image", "mask"):
        manifest[column] = [p.replace(str(collection), gone) if isinstance(p, str) else p for p in manifest[column]]
    manifest.to_parquet(moved / "manifest.parquet", index=False)
    rewrite_stored_paths(RunDir(moved).seen_fingerprints, str(collection), gone)
    assert not any(Path(p).exists() for p in RunDir(moved).seen().rows["image"])
    lines: list[str] = []
    report = evaluate_external(moved, root / "hospital", name="hospital", n_boot=50, say=lines.append)
    excluded = pd.read_csv(moved / "external" / "hospital" / "excluded.csv")
    reason = {Path(p).name: r for p, r in zip(excluded["image"], excluded["reason"])}
    assert reason[hospital["near"]].startswith("near-duplicate of training/validation image")
    assert report["unreadable_training_images"] == 0 and not any("cannot be read" in line for line in lines)

    # without the stored fingerprints the near-copy cannot be found: counted and said, never silent
    RunDir(moved).seen_fingerprints.unlink()
    shutil.rmtree(moved / "external")
    lines.clear()
    report = evaluate_external(moved, root / "hospital", name="hospital", n_boot=50, say=lines.append)
    assert report["unreadable_training_images"] == len(set(seen.rows["image"].astype(str)))
    assert any("cannot be read" in line for line in lines)

    # a tampered fingerprint file is refused by name, with what was expected
    np.savez(RunDir(moved).seen_fingerprints, paths=np.array(["x"]), hashes=np.zeros((1, 3)), thumbnails=np.zeros((1, 1024), np.uint8))
    shutil.rmtree(moved / "external")
    with pytest.raises(CovidCXRError, match="seen_fingerprints.npz: expected paths"):
        evaluate_external(moved, root / "hospital", name="hospital", n_boot=50)
