"""The run store: experiments, runs, metrics and per-image predictions in one database.

SQLAlchemy Core over SQLite (the default, one file beside the runs) or PostgreSQL (several
workers on several machines sharing one grid). The database is the single source of truth
for ``covidcxr experiment status`` and ``table``; run directories only hold checkpoints.

**Claiming.** A worker takes the next runnable run (``pending``, its stage-1 run ``done``;
or ``running`` with a heartbeat older than ``stale_after``: a crashed worker) in one
transaction, like Optuna's RDB storage: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``
(concurrent workers skip a row another one is claiming); on SQLite the transaction starts
with ``BEGIN IMMEDIATE`` (one writer at a time). In both, the claim itself is an
``UPDATE ... WHERE id = :id AND status = :seen_status`` whose row count must be 1, so two
workers can never both own a run. A running worker refreshes ``heartbeat_at`` from a
background thread; a run held by a dead process of this machine (its pid is gone) is
released at once, one held by another machine once its heartbeat is stale.

**Finishing.** The metrics and predictions of a run are written in the same transaction
that marks it ``done`` (and only while the worker still owns it), so a crash leaves either
a finished run or an unfinished one, never half a result.

Tables: ``experiments`` (one per recipe name and scale), ``runs`` (one per grid point and
stage-1 run; unique by experiment, key and config hash, so an edited recipe makes new
runs and keeps the old ones), ``metrics`` (per run and test source, plus the pooled
``seen``/``unseen``/``all`` rows) and ``predictions`` (per run and image).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError

from covidcxr.errors import CovidCXRError
from covidcxr.experiments.recipe import run_identity

__all__ = ["ClaimedRun", "Heartbeat", "RunStore", "StoreError", "Worker", "normalize_url"]

STATUSES = ("pending", "running", "done", "failed")
#: Seconds without a heartbeat after which a ``running`` run's worker is presumed dead
#: (workers beat every 30 s): ``claim`` takes such a run over, ``find_runs`` shows it as ``stale``.
STALE_AFTER_S = 300.0

metadata = MetaData()

experiments_table = Table(
    "experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(300), nullable=False, unique=True),
    Column("recipe_path", Text),
    Column("description", Text),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

runs_table = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", Integer, ForeignKey("experiments.id"), nullable=False),
    Column("key", String(500), nullable=False),
    Column("kind", String(20), nullable=False),  # pretrain | train | adapt
    Column("labels", Text, nullable=False),  # JSON {axis: label}
    Column("config_hash", String(64), nullable=False),
    Column("config", Text, nullable=False),  # the resolved recipe (YAML)
    Column("run_dir", Text, nullable=False),
    Column("depends_on", Integer, ForeignKey("runs.id"), nullable=True),
    Column("status", String(16), nullable=False, default="pending"),
    Column("worker", String(300)),
    Column("host", String(300)),
    Column("pid", Integer),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("seconds", Float),
    Column("error", Text),
    Column("train_metrics", Text),  # JSON: the run's metrics.json
    Column("summary", Text),  # JSON: seen/unseen pooled, gaps, rejected counts
    UniqueConstraint("experiment_id", "key", "config_hash", name="uq_runs_point"),
    Index("ix_runs_experiment_status", "experiment_id", "status"),
)

metrics_table = Table(
    "metrics",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("test_source", String(200), primary_key=True),  # a source, or (seen)/(unseen)/(all)
    Column("scope", String(10), nullable=False),  # source | seen | unseen | all
    Column("seen", Boolean),
    Column("n_images", Integer),
    Column("n_patients", Integer),
    Column("n_positive", Integer),
    Column("n_negative", Integer),
    Column("auc", Float),
    Column("auc_low", Float),
    Column("auc_high", Float),
    Column("sensitivity", Float),
    Column("specificity", Float),
    Column("balanced_accuracy", Float),
    Column("dor", Float),
    Column("accuracy", Float),
    Column("f1", Float),
    Column("note", Text),
    Column("details", Text),  # JSON: the whole metrics dict (every CI, counts, multi-class)
)

predictions_table = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False, index=True),
    Column("image", Text, nullable=False),
    Column("source", String(200), nullable=False),
    Column("patient_id", String(300), nullable=False),
    Column("label", String(50)),
    Column("class_name", String(50)),
    Column("target", Integer),
    Column("positive", Integer, nullable=False),
    Column("probability", Float, nullable=False),
    Column("probabilities", Text),
    Column("seen", Boolean, nullable=False),
)

POOLED = {"seen": "(seen)", "unseen": "(unseen)", "all": "(all)"}
METRIC_COLUMNS = ("auc", "sensitivity", "specificity", "balanced_accuracy", "dor", "accuracy", "f1")


class StoreError(CovidCXRError):
    """The run store cannot be opened or used (bad URL, missing driver, unreachable server)."""


def _now() -> datetime:
    """UTC, naive (SQLite keeps no time zone; every writer uses UTC)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` -> ``postgresql+psycopg://`` (psycopg 3); a path -> ``sqlite:///path``."""
    text = str(url)
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text[len(prefix) :]
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    return text


@dataclass(frozen=True)
class Worker:
    """Who claims runs: ``name`` (unique per process), the machine and the process id."""

    name: str
    host: str
    pid: int

    @classmethod
    def here(cls, name: str | None = None) -> Worker:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(name=name or f"{host}:{pid}", host=host, pid=pid)


@dataclass(frozen=True)
class ClaimedRun:
    """A run this worker now owns: its row id, key, kind, run directory and attempt number."""

    id: int
    key: str
    kind: str
    config_hash: str
    run_dir: str
    attempts: int
    depends_on: int | None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _estimate(metrics: dict[str, Any] | None, name: str) -> float | None:
    if not metrics:
        return None
    entry = metrics.get(name)
    return _finite(entry.get("estimate")) if isinstance(entry, dict) else _finite(entry)


def metric_row(run_id: int, test_source: str, scope: str, metrics: dict[str, Any] | None, seen: bool | None) -> dict[str, Any]:
    """One ``metrics`` row from a `metrics_for_rows` dict (None: an empty set)."""
    m = metrics or {}
    auc = m.get("auc") if isinstance(m.get("auc"), dict) else {}
    return {
        "run_id": run_id,
        "test_source": test_source,
        "scope": scope,
        "seen": seen,
        "n_images": int(m.get("n_images") or 0),
        "n_patients": int(m.get("n_patients") or 0),
        "n_positive": int(m.get("n_positive") or 0),
        "n_negative": int(m.get("n_negative") or 0),
        "auc": _estimate(m, "auc"),
        "auc_low": _finite((auc or {}).get("low")),
        "auc_high": _finite((auc or {}).get("high")),
        **{name: _estimate(m, name) for name in METRIC_COLUMNS if name != "auc"},
        "note": m.get("note") if metrics is not None else "no test images",
        "details": json.dumps(m, default=str, allow_nan=False) if metrics is not None else None,
    }


class RunStore:
    """A database of experiments, runs, metrics and predictions (SQLite or PostgreSQL).

    Args:
        url: an SQLAlchemy URL (``sqlite:////abs/path.sqlite``,
            ``postgresql://user@host:port/db``) or a file path (SQLite).

    Raises:
        StoreError: a bad URL, a missing driver or an unreachable server, named.

    Example:
        >>> store = RunStore("sqlite:///runs/experiments.sqlite")          # doctest: +SKIP
        >>> store.status_frame("tartaglione2020@small").status.value_counts()  # doctest: +SKIP
    """

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        try:
            if self.url.startswith("sqlite"):
                path = self.url.split("///", 1)[1] if "///" in self.url else ""
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(self.url, connect_args={"timeout": 120})
                self._sqlite_transactions(self.engine)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise StoreError(f"--db {url}: not a usable database URL ({exc}); e.g. sqlite:///runs/experiments.sqlite or postgresql://user@host/db") from None
        except ImportError as exc:
            raise StoreError(f"--db {url}: the database driver is not installed ({exc}); for PostgreSQL: pip install 'covidcxr[postgres]'") from None
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                break
            except OperationalError as exc:
                raise StoreError(f"--db {self.safe_url}: cannot open the database: {str(exc.orig).strip() or exc}") from None
            except (IntegrityError, ProgrammingError):
                # another worker created the tables at the same moment (PostgreSQL): look again
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def safe_url(self) -> str:
        """The URL without its password (for messages)."""
        return self.engine.url.render_as_string(hide_password=True)

    @staticmethod
    def _sqlite_transactions(engine: Engine) -> None:
        """Every SQLite transaction takes the write lock up front (``BEGIN IMMEDIATE``).

        pysqlite's own deferred BEGIN lets two workers read the same pending run and both
        try to claim it; an immediate transaction serialises them (SQLAlchemy's documented
        recipe: pysqlite's transaction handling off, BEGIN emitted on the ``begin`` event).
        """

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout = 120000")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ registration
    def register(self, experiment: Any) -> tuple[int, list[int]]:
        """Record an experiment and its runs (stage-1 runs first); existing runs are kept as they are.

        Workers starting together may race to insert the same rows: the loser's transaction
        fails on the unique constraints and is simply run again (it then finds the rows).

        Args:
            experiment: an `ExperimentRecipe`.

        Returns:
            ``(experiment id, run ids of the current expansion, in grid order)``.
        """
        for attempt in range(5):
            try:
                return self._register(experiment)
            except IntegrityError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _register(self, experiment: Any) -> tuple[int, list[int]]:
        now = _now()
        points = experiment.points()
        with self.engine.begin() as conn:
            row = conn.execute(select(experiments_table.c.id).where(experiments_table.c.name == experiment.label)).first()
            if row is None:
                experiment_id = conn.execute(
                    insert(experiments_table).values(
                        name=experiment.label, recipe_path=str(experiment.path or ""), description=experiment.section.description, created_at=now, updated_at=now
                    )
                ).inserted_primary_key[0]
            else:
                experiment_id = row.id
                conn.execute(update(experiments_table).where(experiments_table.c.id == experiment_id).values(updated_at=now, recipe_path=str(experiment.path or "")))
            ids: dict[str, int] = {}
            ordered: list[int] = []

            def ensure(key: str, kind: str, labels: dict[str, str], recipe: Any, depends_on: int | None) -> int:
                digest = run_identity(recipe)
                found = conn.execute(
                    select(runs_table.c.id).where(runs_table.c.experiment_id == experiment_id, runs_table.c.key == key, runs_table.c.config_hash == digest)
                ).first()
                if found is not None:
                    return int(found.id)
                return int(
                    conn.execute(
                        insert(runs_table).values(
                            experiment_id=experiment_id, key=key, kind=kind, labels=json.dumps(labels), config_hash=digest, config=recipe.to_yaml(),
                            run_dir=str(recipe.run_dir()), depends_on=depends_on, status="pending", attempts=0, created_at=now,
                        )
                    ).inserted_primary_key[0]
                )

            for stage_one in experiment.pretrain_runs():
                ids[stage_one.key] = ensure(stage_one.key, "pretrain", {}, stage_one.recipe, None)
                ordered.append(ids[stage_one.key])
            for point in points:
                depends = ids[point.pretrain.key] if point.pretrain is not None else None
                ids[point.key] = ensure(point.key, "train", point.labels, point.recipe, depends)
                ordered.append(ids[point.key])
            for adapt in experiment.adapt_runs():
                ordered.append(ensure(adapt.key, "adapt", adapt.point.labels, adapt.recipe, ids[adapt.point.key]))
        return int(experiment_id), ordered

    def experiment_id(self, label: str) -> int | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(experiments_table.c.id).where(experiments_table.c.name == label)).first()
        return None if row is None else int(row.id)

    # ------------------------------------------------------------------ claiming
    def release_dead_local(self, run_ids: Sequence[int], worker: Worker) -> list[str]:
        """Runs ``running`` on this machine whose process is gone go back to ``pending``; returns their keys."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(runs_table.c.id, runs_table.c.key, runs_table.c.pid, runs_table.c.worker).where(
                    runs_table.c.id.in_(list(run_ids)), runs_table.c.status == "running", runs_table.c.host == worker.host
                )
            ).all()
            released = []
            for row in rows:
                if row.pid is None or row.pid == worker.pid or _pid_alive(int(row.pid)):
                    continue
                result = conn.execute(
                    update(runs_table)
                    .where(runs_table.c.id == row.id, runs_table.c.status == "running", runs_table.c.worker == row.worker)
                    .values(status="pending", worker=None, pid=None, error=f"worker {row.worker} died (pid {row.pid} gone); released")
                )
                if result.rowcount == 1:
                    released.append(row.key)
        return released

    def fail_orphans(self, run_ids: Sequence[int]) -> list[str]:
        """Pending runs whose stage-1 run failed become ``failed`` (naming it); returns their keys."""
        dep = runs_table.alias("dep")
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(runs_table.c.id, runs_table.c.key, dep.c.key.label("dep_key"))
                .select_from(runs_table.join(dep, runs_table.c.depends_on == dep.c.id))
                .where(runs_table.c.id.in_(list(run_ids)), runs_table.c.status == "pending", dep.c.status == "failed")
            ).all()
            for row in rows:
                conn.execute(
                    update(runs_table)
                    .where(runs_table.c.id == row.id, runs_table.c.status == "pending")
                    .values(status="failed", error=f"its stage-1 run {row.dep_key} failed", finished_at=_now())
                )
        return [row.key for row in rows]

    def claim(self, run_ids: Sequence[int], worker: Worker, stale_after: float = STALE_AFTER_S) -> ClaimedRun | None:
        """Take the next runnable run of ``run_ids`` (stage-1 runs first), or None.

        Runnable: ``pending`` with no stage-1 run or a ``done`` one, or ``running`` with a
        heartbeat older than ``stale_after`` seconds (its worker is presumed dead; the run
        resumes from its ``last.ckpt``).
        """
        ids = list(run_ids)
        if not ids:
            return None
        for _ in range(20):
            now = _now()
            cutoff = now - timedelta(seconds=float(stale_after))
            done_ids = select(runs_table.c.id).where(runs_table.c.status == "done").scalar_subquery()
            runnable = or_(
                runs_table.c.status == "pending",
                (runs_table.c.status == "running") & (runs_table.c.heartbeat_at < cutoff),
            )
            query = (
                select(runs_table.c.id, runs_table.c.key, runs_table.c.kind, runs_table.c.status, runs_table.c.worker, runs_table.c.heartbeat_at,
                       runs_table.c.config_hash, runs_table.c.run_dir, runs_table.c.attempts, runs_table.c.depends_on)
                .where(runs_table.c.id.in_(ids), runnable, or_(runs_table.c.depends_on.is_(None), runs_table.c.depends_on.in_(done_ids)))
                .order_by(case({"pretrain": 0, "train": 1}, value=runs_table.c.kind, else_=2), runs_table.c.id.asc())
                .limit(1)
                .with_for_update(skip_locked=True, of=runs_table)
            )
            with self.engine.begin() as conn:
                row = conn.execute(query).first()
                if row is None:
                    return None
                condition = [runs_table.c.id == row.id, runs_table.c.status == row.status]
                if row.status == "running":
                    condition += [runs_table.c.worker == row.worker, runs_table.c.heartbeat_at == row.heartbeat_at]
                note = f"reclaimed from {row.worker} (heartbeat {row.heartbeat_at} stale)" if row.status == "running" else None
                result = conn.execute(
                    update(runs_table)
                    .where(*condition)
                    .values(
                        status="running", worker=worker.name, host=worker.host, pid=worker.pid, heartbeat_at=now, started_at=now,
                        attempts=runs_table.c.attempts + 1, error=note,
                    )
                )
                if result.rowcount == 1:
                    return ClaimedRun(int(row.id), row.key, row.kind, row.config_hash, row.run_dir, int(row.attempts) + 1, row.depends_on)
            time.sleep(0.05)  # another worker won this row: look again
        return None

    def heartbeat(self, run_id: int, worker: Worker) -> bool:
        """Refresh the heartbeat; False when this worker no longer owns the run."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs_table).where(runs_table.c.id == run_id, runs_table.c.worker == worker.name, runs_table.c.status == "running").values(heartbeat_at=_now())
            )
        return result.rowcount == 1

    def finish(
        self,
        run_id: int,
        worker: Worker,
        train_metrics: dict[str, Any] | None,
        metric_rows: Sequence[dict[str, Any]] = (),
        predictions: pd.DataFrame | None = None,
        summary: dict[str, Any] | None = None,
        seconds: float | None = None,
    ) -> bool:
        """Store a run's results and mark it ``done``, in one transaction, if this worker still owns it."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs_table)
                .where(runs_table.c.id == run_id, runs_table.c.worker == worker.name, runs_table.c.status == "running")
                .values(
                    status="done", finished_at=_now(), seconds=seconds, error=None,
                    train_metrics=json.dumps(train_metrics or {}, default=str), summary=json.dumps(summary, default=str) if summary is not None else None,
                )
            )
            if result.rowcount != 1:
                return False  # another worker took the run over (nothing was changed)
            conn.execute(delete(metrics_table).where(metrics_table.c.run_id == run_id))
            conn.execute(delete(predictions_table).where(predictions_table.c.run_id == run_id))
            if metric_rows:
                conn.execute(insert(metrics_table), list(metric_rows))
            if predictions is not None and len(predictions):
                records = _prediction_records(run_id, predictions)
                for start in range(0, len(records), 5000):
                    conn.execute(insert(predictions_table), records[start : start + 5000])
        return True

    def fail(self, run_id: int, worker: Worker, error: str, seconds: float | None = None) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs_table)
                .where(runs_table.c.id == run_id, runs_table.c.worker == worker.name, runs_table.c.status == "running")
                .values(status="failed", error=error[-4000:], finished_at=_now(), seconds=seconds)
            )
        return result.rowcount == 1

    def release(self, run_id: int, worker: Worker, note: str = "interrupted; released") -> bool:
        """Give a run back (``pending``), e.g. on Ctrl-C: the next worker resumes it from last.ckpt."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs_table)
                .where(runs_table.c.id == run_id, runs_table.c.worker == worker.name, runs_table.c.status == "running")
                .values(status="pending", worker=None, pid=None, error=note)
            )
        return result.rowcount == 1

    def retry_failed(self, run_ids: Sequence[int]) -> int:
        """Failed runs of ``run_ids`` back to ``pending``; returns how many."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(runs_table).where(runs_table.c.id.in_(list(run_ids)), runs_table.c.status == "failed").values(status="pending", error=None, worker=None, pid=None)
            )
        return int(result.rowcount)

    # ------------------------------------------------------------------ reading
    def runs_frame(self, run_ids: Iterable[int]) -> pd.DataFrame:
        """The ``runs`` rows of ``run_ids`` (``labels`` decoded), in the given order."""
        ids = list(run_ids)
        columns = [c for c in runs_table.c if c.name not in ("config",)]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).where(runs_table.c.id.in_(ids))).mappings().all()
        frame = pd.DataFrame([dict(r) for r in rows], columns=[c.name for c in columns])
        if frame.empty:
            return frame
        frame["labels"] = frame["labels"].map(json.loads)
        order = {run_id: i for i, run_id in enumerate(ids)}
        return frame.sort_values("id", key=lambda s: s.map(order)).reset_index(drop=True)

    def find_runs(self, experiment: Any, stale_after: float = STALE_AFTER_S) -> pd.DataFrame:
        """The stored runs of an experiment's current expansion (stage-1 runs first), without registering anything.

        Args:
            experiment: the expanded experiment recipe.
            stale_after: a ``running`` run whose heartbeat is older than this many seconds
                is shown as ``stale`` (see `mark_stale`).

        Returns:
            One row per expected run: ``key``, ``kind``, ``labels``, ``config_hash`` and,
            when stored, ``id``, ``status``, ``worker``, ``attempts``, ``seconds``,
            ``error``, ``summary``, ``heartbeat_age_s``, ``stale_reason``... (``status`` is
            ``not registered`` for runs no worker has recorded yet, ``stale`` for a
            ``running`` run whose worker stopped beating).
        """
        expected = [(r.key, "pretrain", {}, r.config_hash, str(r.run_dir)) for r in experiment.pretrain_runs()]
        expected += [(p.key, "train", p.labels, p.config_hash, str(p.run_dir)) for p in experiment.points()]
        expected += [(a.key, "adapt", a.point.labels, a.config_hash, str(a.run_dir)) for a in experiment.adapt_runs()]
        frame = pd.DataFrame(expected, columns=["key", "kind", "labels", "config_hash", "run_dir"])
        experiment_id = self.experiment_id(experiment.label)
        columns = [c for c in runs_table.c if c.name not in ("config", "labels", "kind", "run_dir")]
        stored = pd.DataFrame(columns=[c.name for c in columns])
        if experiment_id is not None:
            with self.engine.connect() as conn:
                rows = conn.execute(select(*columns).where(runs_table.c.experiment_id == experiment_id)).mappings().all()
            stored = pd.DataFrame([dict(r) for r in rows], columns=[c.name for c in columns])
        merged = frame.merge(stored.drop(columns=["experiment_id"]), on=["key", "config_hash"], how="left")
        merged["status"] = merged["status"].fillna("not registered")
        return mark_stale(merged, stale_after)

    def counts(self, run_ids: Iterable[int]) -> dict[str, int]:
        ids = list(run_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs_table.c.status, func.count()).where(runs_table.c.id.in_(ids)).group_by(runs_table.c.status)).all()
        out = {status: 0 for status in STATUSES}
        out.update({row[0]: int(row[1]) for row in rows})
        return out

    def metrics_frame(self, run_ids: Iterable[int]) -> pd.DataFrame:
        ids = list(run_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(select(metrics_table).where(metrics_table.c.run_id.in_(ids))).mappings().all()
        return pd.DataFrame([dict(r) for r in rows], columns=[c.name for c in metrics_table.c])

    def predictions_frame(self, run_ids: Iterable[int]) -> pd.DataFrame:
        ids = list(run_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(select(predictions_table).where(predictions_table.c.run_id.in_(ids))).mappings().all()
        return pd.DataFrame([dict(r) for r in rows], columns=[c.name for c in predictions_table.c])

    def run_config(self, run_id: int) -> str:
        with self.engine.connect() as conn:
            return str(conn.execute(select(runs_table.c.config).where(runs_table.c.id == run_id)).scalar_one())


def _prediction_records(run_id: int, frame: pd.DataFrame) -> list[dict[str, Any]]:
    def text(value: Any) -> str | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else str(value)

    records = []
    for row in frame.itertuples(index=False):
        data = row._asdict()
        records.append({
            "run_id": run_id,
            "image": str(data["image"]),
            "source": str(data["source"]),
            "patient_id": str(data["patient_id"]),
            "label": text(data.get("label")),
            "class_name": text(data.get("class_name")),
            "target": None if data.get("target") is None else int(data["target"]),
            "positive": int(data["positive"]),
            "probability": float(data["probability"]),
            "probabilities": text(data.get("probabilities")),
            "seen": bool(data["seen"]),
        })
    return records


def mark_stale(runs: pd.DataFrame, stale_after: float = STALE_AFTER_S, now: datetime | None = None) -> pd.DataFrame:
    """Show ``running`` runs whose worker stopped beating as ``stale``, with the reason.

    A run is stale when its heartbeat is older than ``stale_after`` seconds, or at once
    when its worker ran on this machine and that process is gone (killed, crashed). The
    database is not changed: a worker's next ``claim`` takes such a run over.

    Args:
        runs: rows with ``status``, ``heartbeat_at``, ``host``, ``pid``, ``worker``.
        stale_after: seconds. now: the time to compare with (UTC, naive; default now).

    Returns:
        A copy with ``heartbeat_age_s`` (seconds, NaN without a heartbeat) and
        ``stale_reason`` columns, ``status`` set to ``stale`` where it applies.

    Example:
        >>> frame = pd.DataFrame({"status": ["running"], "heartbeat_at": [datetime(2026, 1, 1)], "host": ["gpu1"], "pid": [7], "worker": ["gpu1:7"]})
        >>> row = mark_stale(frame, 300, now=datetime(2026, 1, 1, 0, 10)).iloc[0]
        >>> row["status"], float(row["heartbeat_age_s"])
        ('stale', 600.0)
    """
    runs = runs.copy()
    now = now or _now()
    beats = pd.to_datetime(runs["heartbeat_at"]) if "heartbeat_at" in runs else pd.Series(pd.NaT, index=runs.index)
    runs["heartbeat_age_s"] = (now - beats).dt.total_seconds()
    here = socket.gethostname()
    reasons: list[str | None] = []
    for row in runs.itertuples(index=False):
        reason = None
        if row.status == "running":
            age = row.heartbeat_age_s
            pid = getattr(row, "pid", None)
            if getattr(row, "host", None) == here and isinstance(pid, (int, float)) and pid == pid and not _pid_alive(int(pid)):
                reason = f"its worker {row.worker} (pid {int(pid)} on this machine) is gone"
            elif age != age:
                reason = f"no heartbeat recorded by {row.worker}"
            elif age > stale_after:
                reason = f"no heartbeat from {row.worker} for {age / 60:.0f} min (limit {stale_after / 60:.0f} min): its worker is presumed dead"
        reasons.append(reason)
    runs["stale_reason"] = reasons
    runs.loc[runs["stale_reason"].notna(), "status"] = "stale"
    return runs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """A background thread that refreshes a claimed run's heartbeat every ``every`` seconds.

    ``lost`` becomes True when the store says another worker took the run over.
    """

    def __init__(self, store: RunStore, run_id: int, worker: Worker, every: float = 30.0) -> None:
        self.store, self.run_id, self.worker, self.every = store, run_id, worker, float(every)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.store.heartbeat(self.run_id, self.worker):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a transient database error: try again next beat
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
