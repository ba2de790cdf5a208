"""Figures a journal accepts: files beside the page, one palette, the operating point on the ROC,
PR and reliability numbers that match results.json, no overlapping labels."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from covidcxr.evaluate.calibration import calibration_with_ci
from covidcxr.evaluate.cross_source import evaluate_run
from covidcxr.evaluate.curves import precision_recall, sensitivity_at_specificity
from covidcxr.report import figures as fig
from covidcxr.report import write_report
from covidcxr.report.palette import LABEL_COLORS, ROLE_COLORS, TOL_MUTED, label_colors, source_colors
from generated_data import make_fake_run
from report_helpers import write_fake_audit

N_BOOT = 100


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    """The fake audited run (4 sources, gamma unseen) with its t-SNE table, reported with figure files."""
    tmp_path = tmp_path_factory.mktemp("figures")
    run_dir = tmp_path / "run"
    predictions = make_fake_run(run_dir)
    evaluate_run(run_dir, n_boot=N_BOOT)
    write_fake_audit(run_dir)
    rng = np.random.default_rng(0)
    table = predictions[predictions["split"] == "test"][["source", "label", "target", "split"]].reset_index(drop=True)
    table["x"], table["y"] = rng.normal(size=len(table)), rng.normal(size=len(table))
    table.to_parquet(run_dir / "audit" / "embedding.parquet", index=False)
    paths = write_report([run_dir], tmp_path / "report.html")
    return run_dir, paths


def test_every_figure_is_written_as_svg_and_300_dpi_png_and_listed(report) -> None:
    _, paths = report
    listed = json.loads(paths.json.read_text())["figures"]
    kinds = {item["kind"] for item in listed}
    assert {"roc", "pr", "calibration", "composition", "heatmap", "audit", "embedding", "gallery"} <= kinds
    assert paths.figures == paths.html.parent / "report_figures"
    for item in listed:
        png = paths.html.parent / item["png"]
        assert png.is_file(), item
        if item["svg"] is None:  # the audit's raster gallery: copied, not redrawn
            assert item["kind"] == "gallery"
            continue
        svg = (paths.html.parent / item["svg"]).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
        with Image.open(png) as image:
            assert image.info["dpi"][0] == pytest.approx(300, abs=1)
            assert image.width >= 1200  # ≥ 4 inches of figure at 300 dpi
    html = paths.html.read_text()
    assert "report_figures/01-fake-roc.svg" in html  # the page lists the files


def test_one_palette_same_colour_for_a_source_and_a_label_everywhere(report) -> None:
    _, paths = report
    results = paths.results
    palette = results["palette"]
    assert palette["sources"] == {"alpha": TOL_MUTED[0], "beta": TOL_MUTED[1], "delta": TOL_MUTED[2], "gamma": TOL_MUTED[3]}
    run = results["runs"][0]
    # ROC: each source's panel draws its curve in that source's colour; pooled groups in the role colours
    figure = fig.roc_figure(run["roc"], palette)
    for ax, curve in zip(figure.axes, run["roc"]):
        if curve.get("fpr") is None:
            continue
        colours = {to_hex(line.get_color()).upper() for line in ax.get_lines()}
        expected = ROLE_COLORS["pooled" if curve["seen"] is None else ("seen" if curve["seen"] else "unseen")] if curve["pooled"] else palette["sources"][curve["name"]]
        assert expected.upper() in colours, (curve["name"], colours)
    matplotlib.pyplot.close(figure)
    # the embedding map (both panels) uses the same source colours and the fixed label colours
    figure = fig.embedding_figure(run["audit"]["embedding_points"], palette, ["alpha", "beta", "delta"])
    by_source, by_label = figure.axes
    for collection in by_source.collections:
        name = collection.get_label().split(" (")[0]
        assert to_hex(collection.get_facecolor()[0]).upper() == palette["sources"][name].upper()
    for collection in by_label.collections:
        name = collection.get_label().split(" (")[0]
        assert to_hex(collection.get_facecolor()[0]).upper() == label_colors([name])[name].upper()
    assert any("gamma (unseen" in c.get_label() for c in by_source.collections)
    matplotlib.pyplot.close(figure)


def test_palette_is_stable_and_colour_blind_safe() -> None:
    assert source_colors(["b", "a"]) == source_colors(["a", "b", "a"])
    assert source_colors(["a", "b", "c"])["b"] == source_colors(["b", "a"])["b"]  # sorted order, not first-seen order
    assert LABEL_COLORS["covid"] == "#D55E00" and LABEL_COLORS["normal"] == "#009E73"  # Okabe-Ito
    many = source_colors([f"s{i:02d}" for i in range(12)])
    assert len(set(list(many.values())[:9])) == 9


def test_no_figure_has_overlapping_labels(report) -> None:
    _, paths = report
    results = paths.results
    run, palette = results["runs"][0], results["palette"]
    figures = {
        "roc": fig.roc_figure(run["roc"], palette, run["positive_class"]),
        "pr": fig.pr_figure(run["pr"], palette),
        "calibration": fig.calibration_figure(run["calibration"], palette),
        "composition": fig.composition_figure(run["composition"], palette, run["evaluation"]["training_sources"]),
        "heatmap": fig.heatmap_figure(results["cross_source"]),
        "audit": fig.audit_figure(run["audit"]),
        "embedding": fig.embedding_figure(run["audit"]["embedding_points"], palette),
    }
    for name, figure in figures.items():
        assert figure is not None, name
        assert fig.text_overlaps(figure) == [], name
        matplotlib.pyplot.close(figure)


def test_overlap_check_can_fail() -> None:
    figure, ax = matplotlib.pyplot.subplots()
    ax.text(0.5, 0.5, "sensitivity 0.90")
    ax.text(0.52, 0.5, "specificity 0.80")
    assert fig.text_overlaps(figure) == [("sensitivity 0.90", "specificity 0.80")]
    matplotlib.pyplot.close(figure)


def test_operating_point_is_marked_on_the_roc_with_its_intervals(report) -> None:
    run_dir, paths = report
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    run = paths.results["runs"][0]
    op = run["operating_point"]
    assert op["threshold"] == evaluation["threshold"] == 0.5
    assert op["test"]["sensitivity"] == evaluation["overall"]["sensitivity"]
    pooled = run["roc"][0]
    assert pooled["operating_point"]["tpr"] == evaluation["overall"]["sensitivity"]["estimate"]
    assert pooled["operating_point"]["fpr"] == pytest.approx(1 - evaluation["overall"]["specificity"]["estimate"])
    figure = fig.roc_figure(run["roc"], paths.results["palette"])
    markers = [line for line in figure.axes[0].get_lines() if line.get_marker() == "o"]
    assert len(markers) == 1
    np.testing.assert_allclose(np.ravel(markers[0].get_data()), [pooled["operating_point"]["fpr"], pooled["operating_point"]["tpr"]])
    texts = " ".join(t.get_text() for t in figure.axes[0].texts)
    sens = evaluation["overall"]["sensitivity"]
    assert f"sens {sens['estimate']:.2f} [{sens['low']:.2f}, {sens['high']:.2f}]" in texts
    matplotlib.pyplot.close(figure)
    # the one-source panel of delta (negatives only) still places its specificity
    delta = next(c for c in run["roc"] if c["name"] == "delta")
    assert delta["operating_point"] is None or delta["operating_point"]["specificity"]["estimate"] == evaluation["per_source"]["delta"]["specificity"]["estimate"]


def test_curve_numbers_match_the_evaluate_functions(report) -> None:
    run_dir, paths = report
    run = paths.results["runs"][0]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    y, p, g = test["target"].to_numpy(), test["probability"].to_numpy(), test["patient_id"].astype(str).to_numpy()
    pr = precision_recall(y, p, g, n_boot=N_BOOT)
    assert run["pr"][0]["average_precision"] == pytest.approx(pr["average_precision"])
    assert run["pr"][0]["prevalence"] == pytest.approx(y.mean())
    at90 = next(r for r in run["sensitivity_at_specificity"] if r["name"] == "all test images" and r["specificity"] == 0.9)
    assert at90["sensitivity"] == pytest.approx(sensitivity_at_specificity(y, p, g, 0.9, n_boot=N_BOOT)["sensitivity"])
    assert {r["specificity"] for r in run["sensitivity_at_specificity"]} == {0.9, 0.95}
    calibration = run["calibration"]["groups"][0]
    expected = calibration_with_ci(y, p, g, n_boot=N_BOOT)
    assert calibration["ece"] == pytest.approx(expected["ece"]) and calibration["brier"] == pytest.approx(expected["brier"])
    assert [g["name"] for g in run["calibration"]["groups"]] == ["all test images", "seen sources", "unseen sources"]
    html = paths.html.read_text()
    assert "Precision–recall curves" in html and "Calibration" in html and "Operating point" in html


def test_composition_includes_sources_tested_after_training(tmp_path: Path) -> None:
    """Unseen sources scored after training (demo.test_on_every_source) are only in predictions.parquet."""
    run_dir = tmp_path / "run"
    predictions = make_fake_run(run_dir)
    extra = predictions[predictions["source"] == "gamma"].head(10).assign(source="omega", test_set="unseen_source")
    extra["patient_id"] = "omega-" + extra["patient_id"]
    predictions = pd.concat([predictions.assign(test_set="split"), extra], ignore_index=True)
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    paths = write_report([run_dir], tmp_path / "r.html", n_boot=50, figures=False)
    composition = paths.results["runs"][0]["composition"]
    assert composition["tested_only_sources"] == ["omega"]
    omega = [r for r in composition["rows"] if r["source"] == "omega"]
    assert sum(r["test"]["images"] for r in omega) == 10 and sum(r["train"]["images"] for r in omega) == 0
    assert "omega" in paths.results["palette"]["sources"]
    figure = fig.composition_figure(composition, paths.results["palette"], ["alpha", "beta", "delta"])
    assert "omega (unseen)" in [t.get_text() for t in figure.axes[0].get_yticklabels()]
    matplotlib.pyplot.close(figure)


def test_temperature_is_fitted_on_validation_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    predictions = make_fake_run(run_dir)
    rng = np.random.default_rng(3)
    val = predictions[predictions["split"] == "val"].index
    # over-confident validation scores with label noise: a finite temperature above 1
    z = np.where(predictions.loc[val, "target"] == 1, 3.0, -3.0) + rng.normal(size=len(val))
    flip = rng.random(len(val)) < 0.25
    predictions.loc[val, "probability"] = 1 / (1 + np.exp(-np.where(flip, -z, z)))
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    run = write_report([run_dir], tmp_path / "r.html", n_boot=50, figures=False).results["runs"][0]
    temperature = run["calibration"]["temperature"]
    assert temperature["fitted_on"] == "validation split" and temperature["n_val_images"] == len(val)
    assert temperature["temperature"] > 1
    assert temperature["ece"]["estimate"] != run["calibration"]["groups"][0]["ece"]["estimate"]
