"""Abstention and the human model card: when the service must not answer, and what it says the model is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from covidcxr.serve.app import ServeSettings, create_app
from covidcxr.serve.checks import InputWarning
from covidcxr.serve.model_card import NOT_FOR, human_card, one_line_summary
from covidcxr.serve.predictor import ABSTAIN_CODES, Predictor, abstain_reasons, audit_warnings
from serve_fixtures import copy_run, dicom_bytes, phantom_as_uint16, split_images, tiny_run

#: Anything that looks like a server path: an absolute POSIX path segment, a home folder, a Windows drive.
SERVER_PATH = re.compile(r"(?<![\w:/.])/(?:tmp|home|work|root|usr|var|etc|mnt|opt|srv)\b|~/|\b[A-Za-z]:\\")

EVALUATION = {
    "split": "test",
    "threshold": 0.5,
    "training_sources": ["site_a"],
    "per_source": {},
    "seen_unseen": {
        "seen": {"n_images": 48, "n_patients": 31, "auc": {"estimate": 0.97, "low": 0.91, "high": 0.99}},
        "unseen": {"n_images": 40, "n_patients": 27, "auc": {"estimate": 0.62, "low": 0.44, "high": 0.77},
                   "sensitivity": {"estimate": 0.5, "low": 0.3, "high": 0.7}},
        "seen_sources": ["site_a"],
        "unseen_sources": ["site_c"],
    },
}


def _write_audit(run_dir: Path, verdict: str, severity: str | None = None) -> None:
    folder = run_dir / "audit"
    folder.mkdir(exist_ok=True)
    findings = [{"id": "probe", "severity": severity or verdict, "text": f"a {verdict} finding", "value": 0.9}]
    (folder / "audit.json").write_text(json.dumps({"verdict": verdict, "findings": findings}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("abstain") / "run")


@pytest.mark.parametrize(
    ("verdict", "codes"),
    [("no_skill", ["model_no_skill"]), ("shortcut", ["model_shortcut"]), ("warning", []), ("ok", []), (None, ["model_not_audited"]), ("garbage", ["model_not_audited"])],
)
def test_the_audit_decides_whether_every_prediction_abstains(tmp_path: Path, verdict: str | None, codes: list[str]) -> None:
    if verdict == "garbage":
        (tmp_path / "audit").mkdir()
        (tmp_path / "audit" / "audit.json").write_text("{not json")
    elif verdict is not None:
        _write_audit(tmp_path, verdict)
    found = audit_warnings(tmp_path)
    assert [w.code for w in found] == codes
    assert [w.code for w in abstain_reasons(found)] == codes  # every model-level warning is a reason to abstain
    assert all(len(w.message) > 40 for w in found)  # a sentence, not a code


def test_only_the_listed_warnings_make_it_abstain() -> None:
    warnings = [InputWarning(code, "…") for code in ("low_resolution", "colour_marks", "lateral_view", "out_of_distribution", "lateral_view", "no_reference")]
    assert [w.code for w in abstain_reasons(warnings)] == ["lateral_view", "out_of_distribution"]
    assert set(ABSTAIN_CODES) >= {"out_of_distribution", "lateral_view", "implausible_segmentation", "model_shortcut", "model_no_skill"}


def test_an_audited_model_answers_in_distribution_and_abstains_on_a_lateral_view(run_dir: Path, tmp_path: Path) -> None:
    _write_audit(run_dir, "ok")
    try:
        predictor = Predictor.load(run_dir)
        research = Predictor(predictor.run, abstain=False)
    finally:
        (run_dir / "audit" / "audit.json").unlink()
    image = split_images(run_dir, "test")[0]
    answer = predictor.predict_file(image, gradcam=False)
    assert answer.abstain_reasons == [] and answer.decision == answer.model_decision in ("covid", "rest")
    assert answer.to_dict()["abstention"] == "on"
    lateral = tmp_path / "lateral.dcm"
    lateral.write_bytes(dicom_bytes(tmp_path, phantom_as_uint16(image), ViewPosition="LL"))
    refused = predictor.predict_file(lateral, gradcam=False)
    assert refused.decision == "abstain" and "lateral_view" in [w.code for w in refused.abstain_reasons]
    assert refused.model_decision in ("covid", "rest") and 0 <= refused.probability <= 1  # kept, not to be acted on
    payload = refused.to_dict(overlays="none")
    assert payload["abstain_reasons"][0] == {"code": "lateral_view", "sentence": refused.abstain_reasons[0].message}
    assert "not to be acted on" in payload["probability_note"]
    # --no-abstain: the class is given, the reasons are still listed, and the answer says abstention is off
    off = research.predict_file(lateral, gradcam=False)
    assert off.decision == off.model_decision == refused.model_decision and off.abstention == "off"
    assert "lateral_view" in [w.code for w in off.abstain_reasons] and "abstention is off" in off.to_dict()["probability_note"]


def test_the_human_card_says_what_the_model_is(run_dir: Path) -> None:
    (run_dir / "evaluation.json").write_text(json.dumps(EVALUATION))
    _write_audit(run_dir, "shortcut")
    try:
        predictor = Predictor.load(run_dir, out_of_distribution=False)
        card = predictor.model_card()
    finally:
        (run_dir / "evaluation.json").unlink()
        (run_dir / "audit" / "audit.json").unlink()
    summary = card["summary"]
    trained = card["trained_on"]
    images = sum(v["images"] for v in trained.values())
    patients = sum(v["patients"] for v in trained.values())
    assert summary["trained_on"].startswith(f"synthetic phantoms — demo only: {images} images of {patients} patients")
    assert summary["performance"] == [
        "seen sources (site_a): auc 0.97 (95% CI 0.91–0.99) — 48 test images, 31 patients",
        "unseen sources (site_c): auc 0.62 (95% CI 0.44–0.77); sensitivity 0.50 (95% CI 0.30–0.70) — 40 test images, 27 patients",
    ]
    assert summary["audit"].startswith("SHORTCUT") and "every prediction abstains" in summary["audit"]
    assert summary["operating_point"] == card["operating_point"]["describe"] and "threshold" in summary["operating_point"]
    assert summary["not_for"] == list(NOT_FOR)
    assert card["abstention"]["enabled"] is True
    assert [r["code"] for r in card["abstention"]["every_prediction_abstains_because"]] == ["model_shortcut"]
    line = one_line_summary(card)
    assert "unseen-source AUC 0.62 (95% CI 0.44–0.77)" in line and line.endswith("audit: shortcut") and "\n" not in line


def test_real_sources_are_named_with_their_counts() -> None:
    card = {
        "data": {"synthetic": None},
        "trained_on": {"cohen": {"images": 120, "patients": 80}, "kermany": {"images": 300, "patients": 210}},
        "operating_point": {"describe": "threshold 0.42 (Youden's J, chosen on validation)"},
        "audit": None,
        "evaluation": None,
    }
    summary = human_card(card)
    assert summary["trained_on"] == "420 images of 290 patients (train + validation) from 2 source(s) — cohen: 120 images, 80 patients; kermany: 300 images, 210 patients"
    assert summary["performance"][0].startswith("not evaluated")
    assert summary["audit"].startswith("not audited") and "abstains" in summary["audit"]


def test_no_server_path_in_the_model_card_or_a_prediction(run_dir: Path) -> None:
    predictor = Predictor.load(run_dir)
    client = TestClient(create_app(predictor, ServeSettings(gradcam=False)))
    card = client.get("/model")
    assert card.status_code == 200
    image = Path(split_images(run_dir, "test")[0]).read_bytes()
    answer = client.post("/predict", files={"file": ("x.png", image, "image/png")})
    assert answer.status_code == 200
    for text in (card.text, json.dumps({k: v for k, v in answer.json().items() if k != "overlays"})):
        assert not SERVER_PATH.search(text), SERVER_PATH.search(text)
        assert str(run_dir) not in text and str(Path.home()) not in text
    assert card.json()["summary"]["trained_on"].startswith("synthetic phantoms — demo only")
    assert answer.json()["decision"] == "abstain"  # never audited


def test_the_path_pattern_catches_paths() -> None:  # the regex above is what the no-path test relies on
    assert SERVER_PATH.search('{"manifest": "/work/shared/data/cxr/manifest.csv"}')
    assert SERVER_PATH.search("in /tmp/pytest-of-x/run")
    assert not SERVER_PATH.search("sensitivity 0.50 (95% CI 0.30–0.70); outside 1/3-3; data:image/png;base64,AAAA/tmp")
