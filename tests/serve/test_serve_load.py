"""A bounded load test on loopback: 20 concurrent clients x 10 requests, zero errors, same answers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from covidcxr.serve.app import ServeSettings, create_app
from covidcxr.serve.predictor import Predictor
from serve_fixtures import copy_run, running_server, split_images, tiny_run

CLIENTS = 20
REQUESTS_PER_CLIENT = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run_dir = copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("load") / "run")
    predictor = Predictor.load(run_dir)
    with running_server(create_app(predictor, ServeSettings())) as url:
        yield url, predictor, run_dir


def test_concurrent_clients_get_no_errors(served) -> None:
    url, predictor, run_dir = served
    images = [Path(p) for p in split_images(run_dir, "test")[:4]]
    payloads = [p.read_bytes() for p in images]
    expected = [predictor.predict_bytes(data, gradcam=False).probability for data in payloads]

    def client(index: int) -> list[tuple[int, int, float | None, float]]:
        out = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for request in range(REQUESTS_PER_CLIENT):
                which = (index + request) % len(payloads)
                # every fifth request asks for Grad-CAM too: the backward pass shares the network
                params = {"gradcam": "true" if request % 5 == 0 else "false"}
                started = time.perf_counter()
                response = http.post("/predict", files={"file": ("x.png", payloads[which])}, params=params)
                probability = response.json().get("probability") if response.status_code == 200 else None
                out.append((which, response.status_code, probability, time.perf_counter() - started))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [item for batch in pool.map(client, range(CLIENTS)) for item in batch]
    wall = time.perf_counter() - started
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    errors = [(which, status) for which, status, _, _ in results if status != 200]
    assert errors == []
    for which, _, probability, _ in results:  # concurrency changes no answer
        assert probability == pytest.approx(expected[which], abs=1e-6)
    latencies = np.array([seconds for *_, seconds in results])
    print(f"\n{len(results)} requests in {wall:.1f} s ({len(results) / wall:.1f}/s); latency median {np.median(latencies) * 1000:.0f} ms, p95 {np.percentile(latencies, 95) * 1000:.0f} ms")
    assert httpx.get(url + "/health").json()["status"] == "ok"
