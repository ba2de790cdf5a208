"""The report page: findings first, per-source tables with the right numbers, embedded
figures, no external reference, escaping, the not-audited notice, the heatmap, odd runs."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from covidcxr.errors import CovidCXRError
from covidcxr.evaluate.cross_source import cross_source_matrix, evaluate_run
from covidcxr.report import write_report
from covidcxr.report.html import fmt_ci, fmt_num
from generated_data import make_fake_run
from report_helpers import SHORTCUT_TEXT, WARNING_TEXT, make_multiclass_run, table_with_header, write_fake_audit

N_BOOT = 200
DATA_URI = re.compile(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"')
SOURCE_HEADER = ["source", "images", "patients", "pos / neg", "AUC", "sensitivity", "specificity", "bal. accuracy", "DOR"]


def _images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for _, data in DATA_URI.findall(html)]


@pytest.fixture(scope="module")
def audited_report(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("audited")
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    evaluate_run(run_dir, n_boot=N_BOOT)
    write_fake_audit(run_dir)
    paths = write_report([run_dir], tmp_path / "out" / "report.html", figures=False)
    return run_dir, paths, paths.html.read_text(encoding="utf-8")


def test_shortcut_finding_comes_first_in_a_red_banner(audited_report) -> None:
    _, paths, html = audited_report
    assert SHORTCUT_TEXT in html and WARNING_TEXT in html
    banner = html.index('class="verdict v-shortcut"')
    assert banner < html.index('id="headline"') < html.index("Metrics per test source")
    auc = paths.results["runs"][0]["headline"]["auc"]
    title = f"Shortcut learning: this model's pooled test AUC of {auc['estimate']:.3f} (95% CI {auc['low']:.3f}–{auc['high']:.3f}) is not evidence it reads the lungs."
    assert title.replace("'", "&#39;") in html
    assert html.index(SHORTCUT_TEXT) < html.index(WARNING_TEXT)  # most severe first
    assert "NOT FOR MEDICAL USE" in html[: html.index("<main>")]


def test_per_source_table_shows_the_evaluation_numbers(audited_report) -> None:
    run_dir, paths, html = audited_report
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    table = table_with_header(html, SOURCE_HEADER)
    rows = {r[0].split(" ")[0]: r for r in table[1:]}
    for source, m in evaluation["per_source"].items():
        row = rows[source]
        assert ("SEEN" if source in evaluation["training_sources"] else "UNSEEN").lower() in row[0].lower()
        assert row[1] == str(m["n_images"]) and row[2] == str(m["n_patients"])
        assert row[3] == f"{m['n_positive']} / {m['n_negative']}"
        if m["auc"] is None:
            assert row[4] == "–"
        else:
            assert row[4] == f"{fmt_num(m['auc']['estimate'])} {fmt_ci(m['auc'])}"
        assert row[5].startswith(fmt_num((m["sensitivity"] or {}).get("estimate")))
        assert row[-1] == f"{m['tp']} {m['fn']} {m['fp']} {m['tn']}"
    assert rows["gamma"][0].lower().startswith("gamma unseen")
    overall = evaluation["overall"]
    assert rows["all"][4] == f"{fmt_num(overall['auc']['estimate'])} {fmt_ci(overall['auc'])}"
    gap = evaluation["seen_unseen"]["gap"]
    assert f"{gap['auc_diff']:+.3f}" in html


def test_page_is_self_contained_with_embedded_figures(audited_report) -> None:
    _, paths, html = audited_report
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "@import" not in html
    images = _images(html)
    # ROC small multiples, one-run heatmap, composition, audit summary, gallery, embedding
    assert len(images) >= 5 and all(i.format in ("PNG", "JPEG") for i in images)
    assert max(i.width for i in images) <= 1400
    assert paths.html_bytes < 3_000_000


def test_results_json_holds_the_numbers_on_the_page(audited_report) -> None:
    _, paths, html = audited_report
    loaded = json.loads(paths.json.read_text())
    assert paths.json == paths.html.with_name("results.json")
    run = loaded["runs"][0]
    alpha = run["evaluation"]["per_source"]["alpha"]
    assert fmt_ci(alpha["auc"]) in html and fmt_ci(alpha["specificity"]) in html
    assert run["findings"][0]["text"] == SHORTCUT_TEXT
    assert run["audit"]["source_probe"]["full"]["balanced_accuracy"]["estimate"] == 0.97
    assert run["composition"]["totals"]["train"]["images"] == 4


def test_data_from_files_is_escaped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    evil = "<script>alert('x')</script><img src=https://evil.example/x.png>"
    write_fake_audit(run_dir, findings=[{"id": "x", "severity": "shortcut", "text": evil, "value": 1, "threshold": 0.5}])
    html = write_report([run_dir], tmp_path / "r.html", n_boot=50, figures=False).html.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert '<img src=https://evil' not in html


def test_run_without_audit_gets_a_prominent_notice(tmp_path: Path) -> None:
    run_dir = tmp_path / "plain"
    make_fake_run(run_dir)
    paths = write_report([run_dir], tmp_path / "plain.html", n_boot=N_BOOT, figures=False)
    html = paths.html.read_text()
    notice = html.index("This run was not audited for shortcut learning.")
    assert notice < html.index('id="headline"')
    assert f"covidcxr audit {run_dir}" in html and "This run was not audited." in html
    # the evaluation's own findings still show (gamma is unseen and scored at random)
    assert "does not carry over to new sources" in html
    assert paths.results["runs"][0]["audit"]["status"] == "not_audited"


def test_unreadable_audit_and_bad_figure_names_do_not_crash(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    (run_dir / "audit").mkdir()
    (run_dir / "audit" / "audit.json").write_text("{not json")
    html = write_report([run_dir], tmp_path / "a.html", n_boot=50, figures=False).html.read_text()
    assert "The audit could not be read" in html and "unreadable JSON" in html
    write_fake_audit(run_dir, gallery_name="../../../etc/passwd")
    (tmp_path / "secret.png").write_bytes(b"not for the page")
    html = write_report([run_dir], tmp_path / "b.html", n_boot=50, figures=False).html.read_text()
    assert "is named by audit.json but is not a file" in html
    (run_dir / "audit" / "embedding.png").write_bytes(b"\x89PNG broken")
    html = write_report([run_dir], tmp_path / "c.html", n_boot=50, figures=False).html.read_text()
    assert "embedding.png: not a readable image" in html


def test_two_runs_get_the_cross_source_heatmap(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "a", seed=0, name="run-a")
    make_fake_run(tmp_path / "b", seed=1, name="run-b")
    paths = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "both.html", n_boot=N_BOOT, figures=False)
    html = paths.html.read_text()
    assert 'alt="train by test AUC heatmap"' in html and 'id="cross-source"' in html
    table = table_with_header(html, ["run [training sources]"])
    matrix = cross_source_matrix([tmp_path / "a", tmp_path / "b"], n_boot=N_BOOT)
    assert table[0][1:] == list(matrix.columns)
    for row, (name, values) in zip(table[1:], matrix.iterrows()):
        assert row[0] == name
        assert row[1:] == [fmt_num(None if v != v else float(v)) for v in values]
    assert "No two runs scored the same test images" in html
    assert paths.results["cross_source"]["rows"] == list(matrix.index)


def test_multiclass_run_shows_what_is_supported(tmp_path: Path) -> None:
    make_multiclass_run(tmp_path / "three")
    make_fake_run(tmp_path / "binary")
    paths = write_report([tmp_path / "three", tmp_path / "binary"], tmp_path / "mixed.html", n_boot=50, figures=False)
    html = paths.html.read_text()
    run = paths.results["runs"][0]
    assert "are defined for binary runs" in html
    table = table_with_header(html, ["true \\ predicted", "normal", "pneumonia", "covid"])
    assert [r[1:4] for r in table[1:4]] == [[str(v) for v in row] for row in run["multiclass"]["confusion"]]
    assert fmt_num(run["multiclass"]["accuracy"]["estimate"]) in html


def test_output_path_is_checked(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "run")
    with pytest.raises(CovidCXRError, match="expected an .html file"):
        write_report([tmp_path / "run"], tmp_path / "report.txt")
    with pytest.raises(CovidCXRError, match="the same file"):
        write_report([tmp_path / "run"], tmp_path / "r.html", json_path=tmp_path / "r.html")
