"""Hostile clients against the real server on loopback: stalled heads and bodies, floods, paths in responses.

Every loop is bounded in count and in time. The stand-in predictor (`SlowPredictor`) makes
the admission tests independent of the model's speed; the path tests use the tiny run.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from covidcxr.serve.app import Admission, ServeSettings, ServiceBusy, create_app, declared_pixels, redact_paths
from covidcxr.serve.server import ServerLimits, build_server
from serve_fixtures import copy_run, huge_png_header, png_bytes, split_images, tiny_run

STALLED = 100
HEADER_TIMEOUT = 2.0
TOKEN = "s3cret-token"


class SlowPredictor:
    """Stands in for `Predictor`: takes ``seconds`` per image, counts how many run at once."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds
        self.run = SimpleNamespace(name="stand-in", run_dir=Path("/nonexistent/run"))
        self.engine = "torch"
        self.reference = None
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def model_card(self) -> dict:
        return {"name": "stand-in"}

    def predict_bytes(self, data: bytes, gradcam: bool = True):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.seconds)
        finally:
            with self._lock:
                self.running -= 1
        return SimpleNamespace(
            input=SimpleNamespace(format="png", width=8, height=8), probability=0.5, warnings=[], to_dict=lambda: {"probability": 0.5}
        )


@contextlib.contextmanager
def served(app, limits: ServerLimits) -> Iterator[tuple[str, int]]:
    """The real server (`build_server`: deadline protocol and limits) on a free loopback port, in a thread."""
    server = build_server(app, "127.0.0.1", 0, limits, log_level="warning")
    thread = threading.Thread(target=server.run, name="covidcxr-serve-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _half_sent(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send half a request head and stop."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-da")
        sockets.append(sock)
    return sockets


def _closed_by_server(sock: socket.socket, until: float) -> bool:
    """Whether the server closes ``sock`` before the monotonic time ``until`` (reads to EOF)."""
    while time.monotonic() < until:
        sock.settimeout(max(0.05, until - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        if not chunk:
            return True
    return False


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_stalled_half_sent_requests_neither_block_health_nor_stay_open(token: str | None) -> None:
    app = create_app(SlowPredictor(), ServeSettings(token=token))
    with served(app, ServerLimits(header_timeout=HEADER_TIMEOUT)) as (url, port):
        opened = time.monotonic()
        stalled = _half_sent(port, STALLED)
        try:
            with httpx.Client(base_url=url, timeout=5) as http:  # a fresh connection, after the stalled ones
                started = time.perf_counter()
                health = http.get("/health")
                assert health.status_code == 200 and health.json()["status"] == "ok"
                assert time.perf_counter() - started < 1.0
                if token:  # the token is still asked for, and accepted, while the stalled sockets hang
                    assert http.get("/model").status_code == 401
                    assert http.get("/model", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            # every stalled socket is closed by the server by its deadline (+1 s of slack)
            until = opened + HEADER_TIMEOUT + 1.0
            closed = [_closed_by_server(sock, until) for sock in stalled]
            assert all(closed), f"{closed.count(False)} of {STALLED} stalled sockets still open after {HEADER_TIMEOUT + 1:g} s"
        finally:
            for sock in stalled:
                sock.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_trickled_head_is_cut_at_the_deadline_with_408() -> None:
    with served(create_app(SlowPredictor()), ServerLimits(header_timeout=1.0)) as (_, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        reply = b""
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:  # one byte every 0.1 s: per-read timeouts never fire
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.1)
                if time.monotonic() - started > 3:
                    break
            sock.settimeout(2)
            with contextlib.suppress(socket.timeout, ConnectionResetError):
                while chunk := sock.recv(4096):
                    reply += chunk
        finally:
            sock.close()
        assert reply.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 3.5


def test_a_stalled_body_gets_408_within_the_body_deadline() -> None:
    app = create_app(SlowPredictor(), ServeSettings(body_timeout=1.0))
    with served(app, ServerLimits(body_timeout=1.0)) as (_, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n"
            )
            started = time.monotonic()
            reply = b""
            sock.settimeout(5)
            with contextlib.suppress(socket.timeout, ConnectionResetError):
                while chunk := sock.recv(4096):
                    reply += chunk
            waited = time.monotonic() - started
        finally:
            sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"request_timeout"' in reply and 0.8 < waited < 4.0


def test_concurrent_predictions_are_bounded_and_the_overflow_gets_503_with_retry_after() -> None:
    predictor = SlowPredictor(seconds=0.6)
    settings = ServeSettings(max_active=2, max_queue=2, queue_timeout=10)
    image = png_bytes(__import__("numpy").full((64, 64), 0.5))
    with served(create_app(predictor, settings), ServerLimits()) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200  # the client's own set-up is not the server's latency
        ready = threading.Barrier(10, timeout=30)

        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=30) as own:
                ready.wait()  # all ten at once
                return own.post("/predict", files={"file": ("x.png", image)})

        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(post, i) for i in range(10)]
            time.sleep(0.3)  # while the first ones run, /health answers at once
            started = time.perf_counter()
            health = http.get("/health")
            health_seconds = time.perf_counter() - started
            responses = [f.result(timeout=60) for f in futures]
    assert health.status_code == 200 and health_seconds < 1.0
    assert health.json()["load"]["active"] <= 2
    statuses = sorted(r.status_code for r in responses)
    busy = [r for r in responses if r.status_code == 503]
    assert predictor.most_at_once <= 2
    assert statuses.count(200) >= 4 and busy, statuses  # 2 running + 2 queued succeed; the rest are told to come back
    assert all(r.headers["retry-after"] == "2" and r.json()["error"] == "busy" for r in busy)


@pytest.mark.parametrize("pixels", [30_000_000, 70_000_000])
def test_the_pixel_budget_holds_large_images_back(pixels: int) -> None:
    import asyncio

    async def scenario() -> list[str]:
        admission = Admission(max_active=4, max_queue=4, max_pixels_in_flight=80_000_000, queue_timeout=0.3)
        order = []
        await admission.enter(pixels)
        try:
            await admission.enter(pixels)
            order.append("second admitted")
        except ServiceBusy:
            order.append("second refused")
        return order

    expected = "second admitted" if 2 * pixels <= 80_000_000 else "second refused"
    assert asyncio.run(scenario()) == [expected]


def test_declared_pixels_reads_the_header_only() -> None:
    assert declared_pixels(huge_png_header(6000, 6000)) == 36_000_000  # the issue's 36-MP upload
    assert declared_pixels(huge_png_header(20000, 20000)) is None  # a bomb: refused by screening, never decoded
    assert declared_pixels(b"not an image") is None


# ------------------------------------------------------------------ no server paths, OpenAPI behind the token

SERVER_PATHS = re.compile("|".join(re.escape(p) for p in {"/tmp", str(Path.home()), "/work", "/home", "/root"}))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    return copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("hostile") / "run")


@pytest.fixture(scope="module")
def real_client(real_run: Path):
    from covidcxr.serve.predictor import Predictor

    predictor = Predictor.load(real_run)
    with TestClient(create_app(predictor, ServeSettings(token=TOKEN)), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client


def _no_server_path(text: str, run_dir: Path) -> None:
    assert not SERVER_PATHS.search(text), SERVER_PATHS.search(text)
    assert str(run_dir) not in text and str(run_dir.parent) not in text


def test_a_corrupt_image_header_names_no_server_path(real_client: TestClient, real_run: Path) -> None:
    corrupt = [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, garbage header
        b"\xff\xd8\xff\xe0" + b"\x13" * 60,  # JPEG start, garbage
        b"II*\x00" + b"\xff" * 60,  # TIFF, garbage
    ]
    for data in corrupt:
        response = real_client.post("/predict", files={"file": ("scan.png", data)})
        assert response.status_code in (415, 422), response.text
        _no_server_path(response.text, real_run)


def test_the_model_card_names_no_server_path(real_client: TestClient, real_run: Path) -> None:
    card = real_client.get("/model")
    assert card.status_code == 200
    _no_server_path(card.text, real_run)
    assert card.json()["classes"] == ["rest", "covid"]  # redaction keeps the content


def test_paths_in_a_model_card_are_reduced_to_names() -> None:
    """A real run's card holds the collection, the cache and the U-Net weights as server paths."""
    predictor = SlowPredictor()
    home = str(Path.home())
    predictor.model_card = lambda: {
        "data": {"collection": "/work/shared/data/cxr", "manifest": "../shared/data/cxr/manifest.csv"},
        "preprocess": {"segmenter_weights": f"{home}/covidcxr/src/covidcxr/preprocess/weights", "cache_dir": "/tmp/cache", "size": [224, 224]},
        "notes": [f"audit.json in {home}/runs/demo/audit is unreadable (Expecting value: line 1)"],
    }
    with TestClient(create_app(predictor)) as client:
        card = client.get("/model")
    assert not SERVER_PATHS.search(card.text) and "../" not in card.text
    assert card.json()["data"] == {"collection": "cxr", "manifest": "manifest.csv"}
    assert card.json()["preprocess"]["segmenter_weights"] == "weights" and card.json()["preprocess"]["size"] == [224, 224]
    assert card.json()["notes"] == ["audit.json in <server path> is unreadable (Expecting value: line 1)"]


def test_a_prediction_names_no_server_path(real_client: TestClient, real_run: Path) -> None:
    response = real_client.post("/predict", files={"file": ("x.png", Path(split_images(real_run, "test")[0]).read_bytes())}, params={"gradcam": "false"})
    assert response.status_code == 200
    body = response.json()
    body.pop("overlays")
    _no_server_path(str(body), real_run)


def test_openapi_is_behind_the_token_and_docs_are_off(real_client: TestClient, real_run: Path) -> None:
    anonymous = httpx.Client(transport=real_client._transport, base_url=str(real_client.base_url))
    assert anonymous.get("/openapi.json").status_code == 401
    schema = real_client.get("/openapi.json")
    assert schema.status_code == 200 and "/predict" in schema.json()["paths"]
    for page in ("/docs", "/redoc"):
        assert real_client.get(page).status_code == 404


def test_redact_paths_keeps_ratios_urls_and_data_uris() -> None:
    roots = ["/srv/runs/demo"]
    assert redact_paths("aspect outside 1/3-3; left/right balance; see https://example.org/a/b", roots) == (
        "aspect outside 1/3-3; left/right balance; see https://example.org/a/b"
    )
    assert redact_paths("cannot read /srv/runs/demo/checkpoints/best.ckpt now", roots) == "cannot read <server path> now"
    assert redact_paths({"a": ["/x/y/z.png"], "b": "data:image/png;base64,ab/+cd/ef"}) == {"a": ["z.png"], "b": "data:image/png;base64,ab/+cd/ef"}


def test_tame_malloc_applies_on_glibc() -> None:
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    # in a child process: the allocator settings are process-wide
    code = "from covidcxr.serve.server import tame_malloc, release_free_memory; print(tame_malloc()); release_free_memory()"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.strip() == "True", child.stderr
