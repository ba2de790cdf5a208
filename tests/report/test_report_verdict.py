"""The banner's verdicts (no_skill, shortcut, warning, ok), the first-screen flags slot, and the
demo's ground truth read off the audit's findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidcxr.evaluate.cross_source import evaluate_run
from covidcxr.report import write_report
from covidcxr.report.html import build_figures, render_html
from covidcxr.report.results import collect_results, ground_truth_outcome
from generated_data import make_fake_run
from report_helpers import write_fake_audit

N_BOOT = 50
TRUTH = {"site": "alpha", "kind": "marker", "label": "covid", "strength": 0.9, "false_rate": 0.05,
         "description": "a text marker was planted on COVID images of alpha"}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    make_fake_run(run)
    evaluate_run(run, n_boot=N_BOOT)
    return run


def _finding(id_: str, severity: str, text: str) -> dict:
    return {"id": id_, "severity": severity, "text": text, "value": 0.5, "threshold": 0.5}


def _page(run_dir: Path, findings: list[dict], verdict: str | None = None, **kwargs) -> tuple[dict, str]:
    audit = write_fake_audit(run_dir, findings=findings)
    if verdict is not None:
        import json

        audit["verdict"] = verdict
        (run_dir / "audit" / "audit.json").write_text(json.dumps(audit))
    results = collect_results([run_dir], n_boot=N_BOOT, **kwargs)
    return results, render_html(results, build_figures({**results, "runs": []}) | {"runs": [_no_figures()]})


def _no_figures() -> dict:
    return {"roc": None, "pr": None, "calibration": None, "heatmap": None, "composition": None, "audit": None, "embedding": None, "audit_files": []}


def test_no_skill_verdict_comes_first_and_is_rendered(run_dir: Path) -> None:
    gate = "The model's AUC 0.52 [0.41, 0.63] includes 0.5: it has no skill on this test set."
    results, html = _page(run_dir, [_finding("skill_gate", "no_skill", gate), _finding("outside_lung_signal", "shortcut", "x at alpha")], verdict="no_skill")
    run = results["runs"][0]
    assert run["verdict"]["level"] == "no_skill"
    assert run["findings"][0]["id"] == "skill_gate"  # said first
    assert run["verdict"]["title"].startswith(f"No skill: {gate}")
    assert 'class="verdict v-no_skill"' in html and "no skill</span>" in html
    assert html.index(gate.replace("'", "&#39;")) < html.index("x at alpha")


@pytest.mark.parametrize(("verdict", "severity", "css"), [("ok", "ok", "v-ok"), ("warning", "warning", "v-warning"), ("shortcut", "shortcut", "v-shortcut")])
def test_audits_own_verdict_sets_the_banner(run_dir: Path, verdict: str, severity: str, css: str) -> None:
    results, html = _page(run_dir, [_finding("f", severity, "something at beta")], verdict=verdict)
    assert results["runs"][0]["verdict"]["level"] == verdict
    assert f'class="verdict {css}"' in html


def test_first_screen_flags_are_shown_inside_the_verdict(run_dir: Path) -> None:
    results = collect_results([run_dir], n_boot=N_BOOT)
    assert results["runs"][0]["first_screen_flags"] == []
    results["runs"][0]["first_screen_flags"] = [{"id": "hollow_run", "text": "The backbone was frozen with random weights."}]
    html = render_html(results, {"cross_source": None, "runs": [_no_figures()], "exported": []})
    flag = html.index("The backbone was frozen with random weights.")
    assert html.index('id="verdict-1"') < flag < html.index('id="headline"')


@pytest.mark.parametrize(
    ("findings", "outcome"),
    [
        ([_finding("outside_lung_signal", "shortcut", "At alpha the model uses pixels outside the lungs.")], "found"),
        ([_finding("probe", "warning", "The source alpha is readable from the embedding.")], "flagged"),
        ([_finding("within", "warning", "Within a source (alpha, beta, delta, gamma) the AUC is 0.62.")], "missed"),  # lists every source
        ([_finding("outside_lung_signal", "shortcut", "Within each source the model uses pixels outside the lungs.")], "flagged"),
        ([_finding("ok", "ok", "Nothing at alpha.")], "missed"),
    ],
)
def test_ground_truth_outcome_is_read_off_the_findings(run_dir: Path, findings: list[dict], outcome: str) -> None:
    results, html = _page(run_dir, findings, ground_truth=TRUTH)
    truth = results["ground_truth"]
    assert truth["site"] == "alpha" and truth["runs"][0]["outcome"] == outcome
    sentence = truth["runs"][0]["sentence"]
    assert sentence.startswith("A text marker was planted on COVID images of alpha;")
    assert ("found it" in sentence) == (outcome == "found") and ("did not find it" in sentence) == (outcome == "missed")
    assert html.index('id="ground-truth"') < html.index('id="verdict-1"')
    assert sentence.replace("'", "&#39;") in html


def test_ground_truth_of_an_unaudited_run_says_so(run_dir: Path) -> None:
    results = collect_results([run_dir], n_boot=N_BOOT, ground_truth=TRUTH)
    assert results["ground_truth"]["runs"][0]["outcome"] == "not_audited"
    assert "was not audited" in results["ground_truth"]["runs"][0]["sentence"]
    assert collect_results([run_dir], n_boot=N_BOOT)["ground_truth"] is None


def test_ground_truth_outcome_uses_structured_sources_too() -> None:
    run = {"name": "r", "audit": {"status": "audited"}, "verdict": {"level": "shortcut"},
           "roc": [{"name": "alpha", "pooled": False}, {"name": "beta", "pooled": False}],
           "findings": [{"id": "marker", "severity": "shortcut", "text": "a corner marker", "sources": ["alpha"], "origin": "audit"}]}
    assert ground_truth_outcome(TRUTH, [run])["runs"][0]["outcome"] == "found"


def test_demo_passes_its_planted_shortcut() -> None:
    from covidcxr.demo import planted_shortcut
    from covidcxr.train.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml")
    truth = planted_shortcut(recipe)
    assert truth["site"] == "site_a" and truth["kind"] == "marker"
    assert truth["description"] == "a text marker was planted on COVID images of site_a"
    clean = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml", ["data.synthetic.shortcut=null"])
    assert planted_shortcut(clean) is None


def test_report_page_states_the_ground_truth(run_dir: Path, tmp_path: Path) -> None:
    write_fake_audit(run_dir, findings=[_finding("outside_lung_signal", "shortcut", "At alpha the model uses pixels outside the lungs.")])
    paths = write_report([run_dir], tmp_path / "gt.html", n_boot=N_BOOT, ground_truth=TRUTH, figures=False)
    html = paths.html.read_text()
    assert "Ground truth of this data" in html and "the audit found it: outside_lung_signal names alpha as a shortcut." in html
