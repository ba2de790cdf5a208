"""The FastAPI service: answers, the model card, and a 4xx JSON error for every bad input (never a 500)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from covidcxr.serve.app import ServeSettings, create_app
from covidcxr.serve.predictor import Predictor
from serve_fixtures import (
    colour_photo_bytes,
    copy_run,
    dicom_bytes,
    huge_png_header,
    phantom_as_uint16,
    png_bytes,
    split_images,
    tiny_run,
)

PHI_NAME = "Doe^Jane-Zyxwvut"
PHI_ID = "PID-8675309-QX"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("app") / "run")


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return Predictor.load(run_dir)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    with TestClient(create_app(predictor, ServeSettings(max_upload_bytes=2 * 1024 * 1024)), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def phantom(run_dir: Path) -> bytes:
    return Path(split_images(run_dir, "test")[0]).read_bytes()


def _post(client: TestClient, data: bytes, name: str = "image.png", field: str = "file", **params):
    return client.post("/predict", files={field: (name, data, "application/octet-stream")}, params=params)


def test_health_and_model_card(client: TestClient, predictor: Predictor) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["run"] == "serve-tiny"
    assert health.json()["out_of_distribution_check"] is True
    card = client.get("/model").json()
    assert card["classes"] == ["rest", "covid"] and card["threshold"] == predictor.run.threshold
    assert card["sources_seen"] == ["site_a", "site_b", "site_c"]
    assert set(card["splits"]) == {"train", "val", "test"}
    assert card["metrics"]["test"]["n"] == card["splits"]["test"]["images"]
    assert card["out_of_distribution"]["n_train"] == card["splits"]["train"]["images"]
    assert card["audit"] is None and any("audit" in note for note in card["notes"])
    assert card["evaluation"] is None


def test_model_card_reads_audit_findings_when_present(run_dir: Path, predictor: Predictor) -> None:
    audit = run_dir / "audit" / "audit.json"
    audit.parent.mkdir(exist_ok=True)
    finding = {"id": "source_probe", "severity": "shortcut", "text": "the source is predictable from the embedding", "value": 0.97}
    audit.write_text(json.dumps({"verdict": "shortcut", "findings": [finding, {"id": "lung_focus", "severity": "ok", "text": "looks at the lungs", "value": 0.8}]}))
    try:
        card = predictor.model_card()
        audited = Predictor(predictor.run, out_of_distribution=False)
    finally:
        audit.unlink()
    assert card["audit"]["shortcuts"] == 1 and card["audit"]["verdict"] == "shortcut"
    # every prediction of a model the audit caught carries the audit's warning
    result = audited.predict_file(split_images(run_dir, "test")[0], gradcam=False)
    assert [w.code for w in result.warnings][:1] == ["model_shortcut"]
    assert "source is predictable" in result.warnings[0].message
    assert "no_reference" in [w.code for w in result.warnings]  # the distribution check was switched off
    assert card["audit"]["findings"][0] == {**finding, "threshold": None}


def test_predict_a_phantom(client: TestClient, predictor: Predictor, phantom: bytes) -> None:
    response = _post(client, phantom)
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["threshold"] == predictor.run.threshold
    assert body["model_decision"] == ("covid" if body["probability"] >= body["threshold"] else "rest")
    # the tiny run was never audited: the service abstains, says why, and keeps the probability
    assert body["decision"] == "abstain" and body["abstention"] == "on"
    assert [r["code"] for r in body["abstain_reasons"]] == ["model_not_audited"]
    assert "not to be acted on" in body["probability_note"]
    assert body["warnings"] == [] or all({"code", "message"} <= set(w) for w in body["warnings"])
    assert body["out_of_distribution"]["flagged"] is False  # a test phantom from the training sites
    assert set(body["overlays"]) == {"input", "lung_mask", "gradcam"}
    assert all(uri.startswith("data:image/png;base64,") for uri in body["overlays"].values())
    # the same probability as the run's own forward pass on the same preprocessing
    again = predictor.predict_bytes(phantom, gradcam=False)
    assert body["probability"] == pytest.approx(again.probability, abs=1e-6)
    assert response.headers["x-content-type-options"] == "nosniff"


def test_gradcam_can_be_switched_off(client: TestClient, phantom: bytes) -> None:
    body = _post(client, phantom, gradcam="false").json()
    assert "gradcam" not in body["overlays"] and body["saliency"] is None
    assert "gradcam" not in body["timings_ms"]


def test_jpeg_upload_with_a_misleading_name(client: TestClient, run_dir: Path) -> None:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.open(split_images(run_dir, "test")[1]).convert("L").save(buffer, format="JPEG", quality=95)
    body = _post(client, buffer.getvalue(), name="scan.dcm").json()
    assert body["input"]["format"] == "jpeg"  # decided by content, not the name


def _bad_inputs(tmp_path: Path, phantom: bytes) -> dict[str, tuple[bytes, int, str]]:
    return {
        "empty": (b"", 400, "empty_upload"),
        "truncated_png": (phantom[: len(phantom) // 2], 422, "unreadable_image"),
        "text_renamed_png": (b"this is not an image, whatever its name says\n" * 4, 415, "unsupported_media_type"),
        "png_header_20000x20000": (huge_png_header(20000, 20000), 413, "image_too_large"),
        "dicom_without_pixels": (dicom_bytes(tmp_path, None), 422, "unreadable_image"),
        "rgb_photo": (colour_photo_bytes(), 422, "not_a_chest_xray"),
        "extreme_aspect": (png_bytes(np.random.default_rng(0).random((40, 400)).astype(np.float32)), 422, "not_a_chest_xray"),
        "blank_image": (png_bytes(np.full((128, 128), 0.5, np.float32)), 422, "not_a_chest_xray"),
        "ct_dicom": (dicom_bytes(tmp_path, np.zeros((64, 64), np.uint16) + 7, Modality="CT"), 422, "not_a_chest_xray"),
    }


BAD_INPUTS = ["empty", "truncated_png", "text_renamed_png", "png_header_20000x20000", "dicom_without_pixels", "rgb_photo", "extreme_aspect", "blank_image", "ct_dicom"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_its_4xx(client: TestClient, phantom: bytes, tmp_path: Path, case: str) -> None:
    data, status, code = _bad_inputs(tmp_path, phantom)[case]
    response = _post(client, data, name="image.png")
    assert response.status_code == status, (case, response.text)
    body = response.json()
    assert body["error"] == code and body["detail"]
    assert "/tmp" not in body["detail"] and "upload" not in body["detail"].split("/")[-1:]  # no server path


def test_request_problems_get_4xx(client: TestClient, phantom: bytes) -> None:
    missing = client.post("/predict", data={"note": "no file"})
    assert missing.status_code == 400 and missing.json()["error"] == "missing_file"
    wrong_field = _post(client, phantom, field="image")
    assert wrong_field.status_code == 400 and wrong_field.json()["error"] == "missing_file"
    raw = client.post("/predict", content=phantom, headers={"content-type": "image/png"})
    assert raw.status_code == 400
    bad_query = _post(client, phantom, gradcam="maybe")
    assert bad_query.status_code == 400 and bad_query.json()["error"] == "bad_request"
    too_many = client.post("/predict", files=[("file", ("a.png", phantom)), ("file", ("b.png", phantom))])
    assert too_many.status_code == 400
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").json()["error"] == "not_found"


def test_upload_size_limit(client: TestClient) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(3 * 1024 * 1024)
    declared = _post(client, big)
    assert declared.status_code == 413 and declared.json()["error"] == "upload_too_large"

    def chunks():  # no Content-Length: counted while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(12):
            yield bytes(256 * 1024)
        yield b"\r\n--b--\r\n"

    streamed = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and streamed.json()["error"] == "upload_too_large"


def test_dicom_identifiers_are_never_echoed_or_logged(client: TestClient, run_dir: Path, tmp_path: Path, caplog) -> None:
    pixels = phantom_as_uint16(split_images(run_dir, "test")[0])
    data = dicom_bytes(tmp_path, pixels, PatientName=PHI_NAME, PatientID=PHI_ID, ViewPosition="PA", WindowCenter=2048, WindowWidth=4096)
    assert PHI_ID.encode() in data
    caplog.set_level(logging.DEBUG)
    response = _post(client, data, name=f"{PHI_NAME}.dcm")  # the client's file name may itself be identifying
    assert response.status_code == 200, response.text
    assert response.json()["input"]["format"] == "dicom"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (PHI_NAME, PHI_ID, "Doe", "8675309"):
        assert secret not in response.text
        assert secret not in logged
    assert "predict ok: dicom" in logged


def test_lateral_dicom_is_warned(client: TestClient, run_dir: Path, tmp_path: Path) -> None:
    pixels = phantom_as_uint16(split_images(run_dir, "test")[0])
    body = _post(client, dicom_bytes(tmp_path, pixels, ViewPosition="LL")).json()
    assert "lateral_view" in [w["code"] for w in body["warnings"]]


def test_bearer_token(predictor: Predictor, phantom: bytes) -> None:
    with TestClient(create_app(predictor, ServeSettings(token="s3cret-token")), raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200 and client.get("/health").json()["auth_required"] is True
        assert client.get("/").status_code == 200
        none = _post(client, phantom)
        assert none.status_code == 401 and none.json()["error"] == "unauthorized"
        assert none.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/predict", files={"file": ("x.png", phantom)}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert client.get("/model").status_code == 401
        right = client.post("/predict", files={"file": ("x.png", phantom)}, headers={"Authorization": "Bearer s3cret-token"})
        assert right.status_code == 200
        assert client.get("/model", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_page_and_static_files_are_self_contained(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and not re.search(r"innerHTML\s*=", script.text)  # server text never parsed as HTML
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/../app.py").status_code == 404


@pytest.mark.shared_data
def test_a_real_radiograph_gets_a_probability(client: TestClient, shared_collection: Path) -> None:
    import pandas as pd

    manifest = pd.read_csv(shared_collection / "manifest.csv")
    row = manifest[manifest["source"] == "nih"].iloc[0]
    response = _post(client, (shared_collection / row["image"]).read_bytes(), name="cxr.png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0.0 <= body["probability"] <= 1.0 and body["model_decision"] in ("covid", "rest")
    # a model trained on 64-px phantoms has never seen a real radiograph: it must say so, and abstain
    assert "out_of_distribution" in [w["code"] for w in body["warnings"]]
    assert body["decision"] == "abstain" and "out_of_distribution" in [r["code"] for r in body["abstain_reasons"]]
    assert 0.08 <= body["segmentation"]["mask_area_fraction"] <= 0.65  # the U-Net finds real lungs
