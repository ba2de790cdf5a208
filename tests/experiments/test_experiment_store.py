"""The run store on SQLite: registration, claiming (never twice), heartbeats, stale and dead workers, finishing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sqlalchemy import update

from covidcxr.experiments.recipe import load_experiment
from covidcxr.experiments.store import RunStore, StoreError, Worker, _now, metric_row, normalize_url, runs_table


def _experiment(tmp_path: Path, pretrain: bool = True):
    stage_one = tmp_path / "stage1.yaml"
    stage_one.write_text(yaml.safe_dump({"data": {"synthetic": {"n_images": 30, "size": 64}, "task": "pneumonia_vs_normal"}, "model": {"name": "conv8"}}))
    grid = {"optimizer.lr": [0.01, 0.001, 0.0001]}
    if pretrain:
        grid["init"] = {"none": {"model.pretrained": None}, "pre": {"model.pretrained": str(stage_one)}}
    data = {
        "name": "store",
        "data": {"synthetic": {"n_images": 30, "size": 64}},
        "model": {"name": "conv8"},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "experiment": {"grid": grid},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_experiment(path)


def test_register_is_idempotent_and_orders_stage_one_first(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    experiment = _experiment(tmp_path)
    experiment_id, ids = store.register(experiment)
    again_id, again = store.register(experiment)
    assert (again_id, again) == (experiment_id, ids) and len(ids) == 1 + 6
    runs = store.runs_frame(ids)
    assert runs["kind"].tolist() == ["pretrain"] + ["train"] * 6
    assert (runs["status"] == "pending").all()
    assert runs.loc[runs["labels"].map(lambda labels: labels.get("init") == "pre"), "depends_on"].eq(ids[0]).all()
    assert runs.loc[runs["labels"].map(lambda labels: labels.get("init") == "none"), "depends_on"].isna().all()
    found = store.find_runs(experiment)
    assert found["status"].tolist() == ["pending"] * 7 and found["id"].tolist() == ids


def test_claims_respect_dependencies_and_never_hand_out_a_run_twice(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "db.sqlite")
    _, ids = store.register(_experiment(tmp_path))
    first = store.claim(ids, Worker("w1", "h", 1))
    assert first is not None and first.kind == "pretrain" and first.attempts == 1
    # while the stage-1 run is running, only the 3 points without pretraining are runnable
    claimed = [store.claim(ids, Worker(f"w{i}", "h", 1)) for i in range(2, 6)]
    assert [c is not None for c in claimed] == [True, True, True, False]
    assert {c.key.split("/")[1] for c in claimed if c} == {"init=none"}
    assert store.finish(first.id, Worker("w1", "h", 1), {"status": "complete"})
    rest = [store.claim(ids, Worker("w9", "h", 1)) for _ in range(4)]
    assert [r is not None for r in rest] == [True, True, True, False]
    keys = [first.key, *(c.key for c in claimed if c), *(r.key for r in rest if r)]
    assert len(keys) == len(set(keys)) == 7


def test_concurrent_claims_from_threads_and_processes_take_each_run_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = RunStore(url)
    _, ids = store.register(_experiment(tmp_path, pretrain=False))
    got: list[int] = []
    lock = threading.Lock()

    def grab(name: str) -> None:
        mine = RunStore(url)
        while True:
            run = mine.claim(ids, Worker(name, "h", 1))
            if run is None:
                return
            with lock:
                got.append(run.id)

    threads = [threading.Thread(target=grab, args=(f"t{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == sorted(ids)


def test_stale_heartbeat_is_reclaimed_and_the_old_owner_cannot_finish(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "db.sqlite")
    _, ids = store.register(_experiment(tmp_path, pretrain=False))
    dead, alive = Worker("dead", "elsewhere", 99), Worker("alive", "here", 1)
    taken = store.claim(ids[:1], dead)
    assert taken is not None and store.heartbeat(taken.id, dead)
    assert store.claim(ids[:1], alive, stale_after=300) is None  # fresh heartbeat: not reclaimable
    with store.engine.begin() as conn:
        conn.execute(update(runs_table).where(runs_table.c.id == taken.id).values(heartbeat_at=_now() - timedelta(seconds=600)))
    again = store.claim(ids[:1], alive, stale_after=300)
    assert again is not None and again.id == taken.id and again.attempts == 2
    assert not store.heartbeat(taken.id, dead)
    assert not store.finish(taken.id, dead, {"x": 1})  # the dead worker lost it
    row = metric_row(again.id, "site_a", "source", {"n_images": 3, "n_patients": 2, "auc": {"estimate": 0.75, "low": 0.5, "high": 1.0}, "note": None}, True)
    predictions = pd.DataFrame({"image": ["a.png", "b.png"], "source": ["site_a"] * 2, "patient_id": ["p1", "p2"], "label": ["covid", "normal"], "class_name": ["covid", "rest"],
                                "target": [1, 0], "positive": [1, 0], "probability": [0.9, 0.2], "probabilities": [None, None], "seen": [True, True]})
    assert store.finish(again.id, alive, {"status": "complete"}, [row], predictions, {"rule": "x"}, 1.5)
    runs = store.runs_frame(ids[:1])
    assert runs.loc[0, "status"] == "done" and "reclaimed from dead" not in str(runs.loc[0, "error"] or "")
    metrics = store.metrics_frame(ids[:1])
    assert metrics.loc[0, "auc"] == 0.75 and metrics.loc[0, "auc_low"] == 0.5 and bool(metrics.loc[0, "seen"])
    assert store.predictions_frame(ids[:1])["probability"].tolist() == [0.9, 0.2]
    assert store.claim(ids[:1], alive) is None  # done runs are never claimed again


def test_a_dead_process_on_this_machine_is_released_at_once(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "db.sqlite")
    _, ids = store.register(_experiment(tmp_path, pretrain=False))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    here = Worker.here("me")
    crashed = Worker("crashed", here.host, int(gone.stdout))
    taken = store.claim(ids[:1], crashed)
    assert store.release_dead_local(ids, here) == [taken.key]
    assert store.claim(ids[:1], here).id == taken.id
    alive = Worker("alive-elsewhere", here.host, os.getpid())  # a live pid: left alone
    other = store.claim(ids[1:2], alive)
    assert store.release_dead_local(ids, Worker("me2", here.host, os.getpid() + 1)) == [] and other is not None


def test_failed_stage_one_fails_its_points_and_retry_requeues(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "db.sqlite")
    _, ids = store.register(_experiment(tmp_path))
    worker = Worker("w", "h", 1)
    stage_one = store.claim(ids, worker)
    assert store.fail(stage_one.id, worker, "CovidCXRError: boom")
    orphans = store.fail_orphans(ids)
    assert len(orphans) == 3 and all("init=pre" in key for key in orphans)
    runs = store.runs_frame(ids)
    assert (runs.loc[runs["status"] == "failed", "error"].str.contains("boom|stage-1 run pretrain/")).all()
    assert store.retry_failed(ids) == 4 and store.counts(ids)["pending"] == 7


def test_bad_urls_are_clear_errors(tmp_path: Path) -> None:
    assert normalize_url("postgresql://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert normalize_url(str(tmp_path / "x.sqlite")).startswith("sqlite:////")
    with pytest.raises(StoreError, match="not a usable database URL"):
        RunStore("nosuchdb://x/y")
    with pytest.raises(StoreError, match="cannot open the database"):
        RunStore("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_status_marks_runs_whose_heartbeat_stopped_as_stale(tmp_path: Path) -> None:
    """A killed worker's run is not shown as "running" until someone reclaims it."""
    import json

    from typer.testing import CliRunner

    from covidcxr.cli import app

    store = RunStore(tmp_path / "db.sqlite")
    experiment = _experiment(tmp_path, pretrain=False)
    _, ids = store.register(experiment)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    here = Worker.here("me")
    killed = store.claim(ids[:1], Worker("killed", here.host, int(gone.stdout)))  # this machine, process gone
    silent = store.claim(ids[1:2], Worker("silent", "other-host", 4242))  # another machine, heartbeat stopped
    beating = store.claim(ids[2:3], Worker("beating", "other-host", 4343))  # another machine, fresh heartbeat
    with store.engine.begin() as conn:
        conn.execute(update(runs_table).where(runs_table.c.id == silent.id).values(heartbeat_at=_now() - timedelta(seconds=900)))
    runs = store.find_runs(experiment).set_index("key")
    assert runs.loc[killed.key, "status"] == "stale" and "is gone" in runs.loc[killed.key, "stale_reason"]
    assert runs.loc[silent.key, "status"] == "stale" and "for 15 min" in runs.loc[silent.key, "stale_reason"]
    assert runs.loc[beating.key, "status"] == "running" and pd.isna(runs.loc[beating.key, "stale_reason"])
    assert runs.loc[silent.key, "heartbeat_age_s"] == pytest.approx(900, abs=30)

    result = CliRunner().invoke(app, ["experiment", "status", str(tmp_path / "exp.yaml"), "--db", str(tmp_path / "db.sqlite"), "--json"])
    assert result.exit_code == 0, result.output
    shown = {run["key"]: run for run in json.loads(result.stdout)["runs"]}
    assert shown[silent.key]["status"] == "stale" and "presumed dead" in shown[silent.key]["stale_reason"]
    assert json.loads(result.stdout)["counts"]["stale"] == 2
