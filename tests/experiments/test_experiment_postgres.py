"""Two workers share one grid through a real PostgreSQL server on loopback: every run done exactly once.

The server is Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``),
started by this test in a temporary directory (trust authentication, 127.0.0.1, a free
port) and stopped at the end. PostgreSQL refuses to run as root, so under root it runs
as the ``postgres`` user (``runuser``). Where the package, that user or psycopg is
missing, the test is skipped and says which.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from covidcxr.experiments.recipe import load_experiment
from covidcxr.experiments.store import RunStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_experiment_runner import write_grid  # noqa: E402


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql; expected /usr/lib/postgresql/<version>/bin/initdb)")
    return Path(found[-1]).parent


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as (PostgreSQL refuses root)")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as the 'postgres' user")
    return [runuser, "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg (pip install 'covidcxr[postgres]') is needed to talk to PostgreSQL")
    bin_dir = _postgres_bin()
    prefix = _as_server_user()
    home = Path(tempfile.mkdtemp(prefix="covidcxr-pg-"))
    home.chmod(0o755)
    data, sockets = home / "data", home / "sock"
    sockets.mkdir()
    if prefix:
        entry = pwd.getpwnam("postgres")
        for path in (home, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    init = subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "grid", "--auth=trust", "-E", "UTF8"], capture_output=True, text=True, env=env)
    if init.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"initdb failed, so no PostgreSQL server here: {init.stderr.strip()[-300:]}")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=50"
    start = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "server.log"), "-w", "-t", "60", "start"], capture_output=True, text=True, env=env)
    if start.returncode != 0:
        log = (home / "server.log").read_text(errors="replace")[-500:] if (home / "server.log").exists() else ""
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]} {log}")
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=grid dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE experiments")
        yield f"postgresql://grid@127.0.0.1:{port}/experiments"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, env=env)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_one_grid_each_run_done_once(postgres_url: str, tmp_path: Path) -> None:
    grid = {"optimizer.lr": [0.01, 0.001], "sites": {"a": {"data.sources": ["site_a"]}, "ab": {"data.sources": ["site_a", "site_b"]}}}
    path = write_grid(tmp_path, "shared", grid=grid)
    experiment = load_experiment(path)
    command = [sys.executable, "-m", "covidcxr", "experiment", "run", str(path), "--db", postgres_url, "--heartbeat", "2"]
    workers = [
        subprocess.Popen([*command, "--worker", f"worker-{i}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (1, 2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    store = RunStore(postgres_url)
    runs = store.find_runs(experiment)
    assert len(runs) == 4 and (runs["status"] == "done").all(), runs[["key", "status", "error"]]
    assert (runs["attempts"] == 1).all()  # nobody claimed a run another worker had
    assert set(runs["worker"]) <= {"worker-1", "worker-2"}
    done_by = [int(out.split("this worker: ")[1].split(" run(s) done")[0]) if "this worker: " in out else 0 for out in outputs]
    assert sum(done_by) == 4, outputs
    # the results are in the server: one metrics row per source and pooled group, predictions per run
    metrics = store.metrics_frame(runs["id"].astype(int))
    assert len(metrics) == 4 * (3 + 3)
    predictions = store.predictions_frame(runs["id"].astype(int))
    assert predictions.groupby("run_id")["image"].nunique().min() > 0
    assert (predictions.groupby(["run_id", "image"]).size() == 1).all()  # no run stored twice
    store.dispose()
