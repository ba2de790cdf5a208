"""The grid runner on phantoms: train, test on every source, store; rerun skips; crash resumes; failures recorded; table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from covidcxr.experiments.recipe import load_experiment
from covidcxr.experiments.runner import run_experiment
from covidcxr.experiments.store import RunStore
from covidcxr.experiments.table import grid_table, markdown_table
from generated_data import tiny_train_recipe

SITES = ["site_a", "site_b", "site_c"]


def _quiet(_: str) -> None:
    pass


def write_grid(root: Path, name: str = "grid", grid: dict | None = None, **sections) -> Path:
    """A tiny experiment recipe on phantoms: stage-1 pneumonia pretraining (or none) x training sites."""
    stage_one = root / "stage1.yaml"
    pretrain = tiny_train_recipe(root, "stage1", data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "pneumonia_vs_normal", "split": {"test_size": 0.2, "val_size": 0.25}})
    stage_one.write_text(yaml.safe_dump(pretrain, sort_keys=False))
    recipe = tiny_train_recipe(root, name, **sections)
    recipe["experiment"] = {
        "grid": grid
        if grid is not None
        else {
            "init": {"none": {"model.pretrained": None}, "pre": {"model.pretrained": str(stage_one)}},
            "sites": {"a": {"data.sources": ["site_a"]}, "ab": {"data.sources": ["site_a", "site_b"]}},
        },
        "test_sources": "all",
        "n_boot": 50,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("grid")
    experiment = load_experiment(write_grid(root))
    store = RunStore(root / "runs" / "experiments.sqlite")
    report = run_experiment(experiment, store, say=_quiet)
    return root, experiment, store, report


def test_grid_runs_every_point_once_with_one_shared_stage_one(finished) -> None:
    _, experiment, store, report = finished
    assert report.failed == [] and report.done_before == 0
    assert len(report.ran) == 5 and report.ran[0].startswith("pretrain/")
    assert report.counts == {"pending": 0, "running": 0, "done": 5, "failed": 0}
    runs = store.find_runs(experiment)
    assert (runs["status"] == "done").all() and (runs["attempts"] == 1).all()
    for point in experiment.points():
        assert (point.run_dir / "checkpoints" / "best.ckpt").is_file()


def test_every_source_is_tested_patient_disjoint_from_what_the_model_learned(finished) -> None:
    _, experiment, store, _ = finished
    runs = store.find_runs(experiment)
    for point in experiment.points():
        run_id = int(runs.loc[runs["key"] == point.key, "id"].iloc[0])
        predictions = store.predictions_frame([run_id])
        metrics = store.metrics_frame([run_id]).set_index("test_source")
        trained = set(point.recipe.data.sources)
        assert set(predictions["source"]) == set(SITES)
        assert {s for s in SITES if bool(metrics.loc[s, "seen"])} == trained
        assert predictions.groupby("source")["seen"].first().to_dict() == {s: s in trained for s in SITES}
        used = pd.read_parquet(point.run_dir / "manifest.parquet")
        learned = [used[used["split"].isin(["train", "val"])]]
        if point.pretrain is not None:
            stage_one = pd.read_parquet(point.pretrain.run_dir / "manifest.parquet")
            learned.append(stage_one[stage_one["split"].isin(["train", "val"])])
        learned_patients = set(pd.concat(learned)["patient_id"])
        assert not set(predictions["patient_id"]) & learned_patients
        # seen sources: exactly the run's own test split (less what stage 1 learned from)
        test_split = used[(used["split"] == "test") & ~used["patient_id"].isin(learned_patients)]
        assert set(predictions.loc[predictions["seen"], "image"]) == set(test_split["image"])
        for source in SITES:
            rows = predictions[predictions["source"] == source]
            assert metrics.loc[source, "n_images"] == len(rows) > 0
            assert metrics.loc[source, "n_positive"] == int(rows["positive"].sum())
        assert metrics.loc["(all)", "n_images"] == len(predictions)
        assert metrics.loc["(seen)", "n_images"] + metrics.loc["(unseen)", "n_images"] == len(predictions)
    # unseen site_c, no pretraining: every site_c image that fits the task is tested
    point = next(p for p in experiment.points() if p.key == "init=none/sites=a")
    run_id = int(runs.loc[runs["key"] == point.key, "id"].iloc[0])
    manifest = pd.read_csv(Path(point.recipe.preprocess.cache_dir).glob("phantoms-*/manifest.csv").__next__())
    site_c = manifest[(manifest["source"] == "site_c")]
    assert (store.predictions_frame([run_id])["source"] == "site_c").sum() == len(site_c)


def test_a_rerun_runs_nothing_new(finished) -> None:
    _, experiment, store, _ = finished
    before = store.find_runs(experiment)[["key", "finished_at"]]
    report = run_experiment(load_experiment(experiment.path), store, say=_quiet)
    assert report.ran == [] and report.failed == [] and report.done_before == 5
    assert store.find_runs(experiment)[["key", "finished_at"]].equals(before)


def test_table_has_one_row_per_point_and_the_stored_numbers(finished) -> None:
    _, experiment, store, _ = finished
    table = grid_table(experiment, store)
    assert table.axes == ["init", "sites"] and table.sources == SITES
    assert len(table.pooled) == 4 and len(table.cells) == 4 * 3 and table.missing == []
    runs = store.find_runs(experiment)
    metrics = store.metrics_frame(runs["id"].dropna().astype(int))
    for row in table.cells.itertuples(index=False):
        run_id = int(runs.loc[runs["key"] == f"init={row.init}/sites={row.sites}", "id"].iloc[0])
        stored = metrics[(metrics["run_id"] == run_id) & (metrics["test_source"] == row.test_source)].iloc[0]
        assert row.n_images == stored["n_images"] and row.seen == stored["seen"]
        assert (pd.isna(row.auc) and pd.isna(stored["auc"])) or row.auc == pytest.approx(stored["auc"])
    text = markdown_table(table)
    assert text.count("\n| none |") + text.count("\n| pre |") == 8 and "seen AUC" in text


def test_kfold_points_pool_out_of_fold_and_ensembles_average_three_class_runs(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path, "folds", grid={"net": {"a": {"optimizer.lr": 0.003}, "b": {"optimizer.lr": 0.001}}},
        data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "three_class", "sources": ["site_a", "site_b"], "balance": "none", "split": {"kind": "kfold", "folds": 2, "val_size": 0.25}},
        train={"epochs": 1, "batch_size": 8, "checkpoint_every_n_steps": 0, "monitor": "val_loss"},
    )
    data = yaml.safe_load(path.read_text())
    data["experiment"]["ensembles"] = ["net"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    experiment = load_experiment(path)
    assert [p.key for p in experiment.points()] == ["net=a/fold=0", "net=a/fold=1", "net=b/fold=0", "net=b/fold=1"]
    store = RunStore(tmp_path / "db.sqlite")
    report = run_experiment(experiment, store, say=_quiet)
    assert report.failed == [] and len(report.ran) == 4, report.failed
    table = grid_table(experiment, store)
    assert table.pooled["net"].tolist() == ["a", "b", "ensemble"]
    assert table.pooled["runs_done"].tolist() == [2, 2, 4]
    runs = store.find_runs(experiment)
    predictions = store.predictions_frame(runs["id"].astype(int))
    assert predictions["probabilities"].notna().all()  # 3-class runs keep every class' probability
    cells = table.cells.set_index(["net", "test_source"])
    for net in ("a", "b"):
        ids = runs.loc[runs["key"].str.startswith(f"net={net}/"), "id"].astype(int)
        mine = predictions[predictions["run_id"].isin(ids)]
        seen = mine[mine["seen"]]
        assert not seen["image"].duplicated().any()  # out-of-fold: each seen image tested by one fold
        unseen = mine[~mine["seen"]]
        assert (unseen.groupby("image").size() == 2).all()  # unseen: every fold model, then averaged
        assert cells.loc[(net, "site_a"), "n_images"] == seen["image"][seen["source"] == "site_a"].nunique()
        assert cells.loc[(net, "site_c"), "n_images"] == unseen["image"][unseen["source"] == "site_c"].nunique()
        assert not bool(cells.loc[(net, "site_c"), "seen"])
    assert cells.loc[("ensemble", "site_c"), "n_images"] == cells.loc[("a", "site_c"), "n_images"]
    pooled = table.pooled.set_index("net")
    for column in ("seen_accuracy_3class", "unseen_accuracy_3class", "seen_accuracy_2class"):
        assert 0.0 <= pooled.loc["ensemble", column] <= 1.0


def test_local_adaptation_fine_tunes_on_few_unseen_images_and_tests_before_and_after(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "adapt", grid={"sites": {"a": {"data.sources": ["site_a"]}}})
    data = yaml.safe_load(path.read_text())
    data["experiment"]["adapt"] = {"positives": {"source": "site_b", "images": 2}, "negatives": {"source": "site_c", "images": 6}, "val_fraction": 0.3}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    experiment = load_experiment(path)
    (adapt,) = experiment.adapt_runs()
    assert adapt.key == "sites=a/adapt" and adapt.recipe.model.pretrained == str(adapt.point.run_dir)
    store = RunStore(tmp_path / "db.sqlite")
    report = run_experiment(experiment, store, say=_quiet)
    assert report.failed == [] and report.ran == ["sites=a", "sites=a/adapt"], report.failed
    manifest = pd.read_csv(adapt.manifest_path)
    fit = manifest[manifest["split"].isin(["train", "val"])]
    assert set(fit["source"]) == {"site_b", "site_c"} and set(manifest["split"]) == {"train", "val", "test"}
    assert (fit.loc[fit["source"] == "site_b", "label"] == "covid").sum() >= 2 and (fit.loc[fit["source"] == "site_c", "label"] != "covid").all()
    test = manifest[manifest["split"] == "test"]
    assert not set(test["patient_id"]) & set(fit["patient_id"])
    point_manifest = pd.read_parquet(adapt.point.run_dir / "manifest.parquet")
    learned = point_manifest[point_manifest["split"].isin(["train", "val"])]
    assert not set(manifest["patient_id"]) & set(learned["patient_id"])
    table = grid_table(experiment, store)
    rows = table.adaptation
    assert set(zip(rows["source"], rows["class"])) == {("site_b", "positive"), ("site_c", "negative")}
    assert rows["n"].sum() == len(test) and rows["before"].between(0, 1).all() and rows["after"].between(0, 1).all()
    assert rows["mcnemar_p"].notna().all() and "Local adaptation" in markdown_table(table)


def test_a_killed_worker_loses_only_the_run_in_progress(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "crash", grid={"optimizer.lr": [0.01, 0.003, 0.001]}, train={"epochs": 3, "batch_size": 8, "checkpoint_every_n_steps": 1})
    db = tmp_path / "runs" / "experiments.sqlite"
    experiment = load_experiment(path)
    store = RunStore(db)
    _, ids = store.register(experiment)
    script = (
        "from covidcxr.experiments.recipe import load_experiment; from covidcxr.experiments.store import RunStore;"
        "from covidcxr.experiments.runner import run_experiment;"
        f"run_experiment(load_experiment({str(path)!r}), RunStore({str(db)!r}), say=lambda m: None)"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            counts = store.counts(ids)
            runs = store.runs_frame(ids)
            running = runs[runs["status"] == "running"]
            if counts["done"] >= 1 and len(running) and Path(running["run_dir"].iloc[0], "checkpoints", "last.ckpt").is_file():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the worker did not get going")
        os.killpg(worker.pid, signal.SIGKILL)  # a crash: no clean-up at all
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    done_before = set(store.runs_frame(ids).query("status == 'done'")["key"])
    killed = store.runs_frame(ids).query("status == 'running'")["key"].tolist()
    assert len(killed) == 1
    report = run_experiment(load_experiment(path), store, say=_quiet)
    assert report.failed == [] and set(report.ran) == {p.key for p in experiment.points()} - done_before
    runs = store.runs_frame(ids).set_index("key")
    assert (runs["status"] == "done").all()
    assert runs.loc[killed[0], "attempts"] == 2  # released (its process is gone) and resumed
    assert (runs.drop(index=killed)["attempts"] == 1).all()


def test_a_failing_point_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "fails", grid={"sites": {"a": {"data.sources": ["site_a"]}, "ghost": {"data.sources": ["site_z"]}}})
    store = RunStore(tmp_path / "db.sqlite")
    report = run_experiment(load_experiment(path), store, say=_quiet)
    assert [key for key, _ in report.failed] == ["sites=ghost"]
    assert "site_z" in report.failed[0][1] and "not in the collection" in report.failed[0][1]
    assert report.ran == ["sites=a"] and report.counts["failed"] == 1
    status = store.find_runs(load_experiment(path)).set_index("key")
    assert status.loc["sites=ghost", "status"] == "failed" and "site_z" in status.loc["sites=ghost", "error"]
    again = run_experiment(load_experiment(path), store, say=_quiet)
    assert again.ran == [] and again.failed == []  # failed runs stay failed unless retried
    retried = run_experiment(load_experiment(path), store, retry_failed=True, say=_quiet)
    assert [key for key, _ in retried.failed] == ["sites=ghost"]


def test_multi_process_runs_train_in_a_child_covidcxr_train(tmp_path: Path) -> None:
    from covidcxr.experiments.runner import _needs_child_process
    from covidcxr.train.recipe import recipe_from_mapping

    def recipe(**engine):
        return recipe_from_mapping(tiny_train_recipe(tmp_path, "x", engine={"threads": 1, **engine}))

    assert not _needs_child_process(recipe())  # CPU, devices auto: this process
    assert not _needs_child_process(recipe(devices=1))
    assert _needs_child_process(recipe(devices=2, accelerator="cpu", strategy="ddp"))
    assert _needs_child_process(recipe(devices=[0, 1]))
    assert _needs_child_process(recipe(num_nodes=2))


def test_keep_prunes_each_run_once_done_but_never_a_model_another_run_starts_from(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "keep", grid={"sites": {"a": {"data.sources": ["site_a"]}}})
    data = yaml.safe_load(path.read_text())
    data["experiment"]["adapt"] = {"positives": {"source": "site_b", "images": 2}, "negatives": {"source": "site_c", "images": 6}, "val_fraction": 0.3}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    experiment = load_experiment(path, ["output.keep=last"])  # what `covidcxr experiment run --keep last` adds
    (point,) = experiment.points()
    (adapt,) = experiment.adapt_runs()
    said: list[str] = []
    report = run_experiment(experiment, RunStore(tmp_path / "db.sqlite"), say=said.append)
    assert report.failed == [] and report.ran == ["sites=a", "sites=a/adapt"], report.failed
    # the point's model is where its adaptation run starts: it keeps every checkpoint
    assert {p.name for p in (point.run_dir / "checkpoints").glob("*.ckpt")} == {"best.ckpt", "last.ckpt"}
    assert any("sites=a keeps every checkpoint" in line for line in said)
    # the adaptation run, done (trained, tested, stored), keeps only last.ckpt
    assert {p.name for p in (adapt.run_dir / "checkpoints").glob("*.ckpt")} == {"last.ckpt"}
    assert (adapt.run_dir / "metrics.json").is_file() and '"keep": "last"' in (adapt.run_dir / "metrics.json").read_text()
    assert yaml.safe_load((adapt.run_dir / "config.yaml").read_text())["output"]["keep"] == "all"  # trained keeping all
