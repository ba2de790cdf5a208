from covidcxr.audit.findings import derive_findings, verdict


def ci(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high}


def by_id(findings):
    return {f["id"]: f for f in findings}


def test_outside_lung_signal_is_a_shortcut_when_the_blanked_model_keeps_its_auc():
    ablation = {
        "original": {"auc": ci(0.95, 0.91, 0.98), "within_source_auc": ci(0.93, 0.86, 0.98)},
        "lungs_blanked": {"auc": ci(0.95, 0.91, 0.98), "within_source_auc": ci(0.94, 0.88, 0.98)},
        "lungs_only": {"auc": ci(0.43, 0.32, 0.55)},
    }
    found = by_id(derive_findings({}, ablation, {}, {}, "none"))
    assert found["outside_lung_signal"]["severity"] == "shortcut"
    assert "0.94 [0.88, 0.98]" in found["outside_lung_signal"]["text"]
    assert found["lungs_only"]["severity"] == "warning"
    assert verdict(list(found.values())) == "shortcut"


def test_no_outside_lung_signal_is_ok_and_wide_intervals_do_not_alarm():
    ablation = {
        "original": {"auc": ci(0.60, 0.45, 0.75)},
        "lungs_blanked": {"auc": ci(0.62, 0.48, 0.77), "within_source_auc": ci(0.62, 0.48, 0.77)},
        "lungs_only": {"auc": ci(0.58, 0.44, 0.72)},
    }
    found = by_id(derive_findings({}, ablation, {}, {}, "none"))
    assert found["outside_lung_signal"]["severity"] == "ok"  # CI reaches below 0.5: not enough evidence
    assert found["lungs_only"]["severity"] == "ok"


def test_masked_runs_get_an_info_instead_of_the_blanking_test():
    ablation = {"original": {"auc": ci(0.9, 0.85, 0.95)}, "lungs_blanked": {"skipped": "masked"}, "lungs_only": {"auc": ci(0.9, 0.85, 0.95)}}
    found = by_id(derive_findings({}, ablation, {}, {}, "mask"))
    assert found["outside_lung_signal"]["severity"] == "info"
    assert "lungs_only" not in found


def test_a_model_no_better_than_a_source_detector_is_flagged():
    evaluation = {
        "overall": {"auc": ci(0.933, 0.90, 0.96)},
        "source_only": {**ci(0.959, 0.93, 0.98), "prevalence": {"cohen": 0.79, "kermany": 0.0}},
        "within_source": {**ci(0.589, 0.42, 0.77), "sources": ["cohen"]},
    }
    found = by_id(derive_findings(evaluation, {}, {}, {}, "mask"))
    assert found["source_detector_baseline"]["severity"] == "shortcut"
    assert "cohen 79%" in found["source_detector_baseline"]["text"]
    assert found["within_source_auc"]["severity"] == "shortcut"
    assert found["within_source_auc"]["value"] == 0.589


def test_source_probe_is_a_shortcut_only_when_the_data_are_confounded():
    probe = {"lungs_blanked": {"balanced_accuracy": ci(0.97, 0.95, 0.99), "chance": 1 / 3, "n_sources": 3}}
    confounded = {"overall": {"auc": ci(0.9, 0.85, 0.95)}, "source_only": ci(0.8, 0.7, 0.9)}
    balanced = {"overall": {"auc": ci(0.9, 0.85, 0.95)}, "source_only": ci(0.5, 0.4, 0.6)}
    assert by_id(derive_findings(confounded, {}, probe, {}))["source_probe_lungs_blanked"]["severity"] == "shortcut"
    plain = by_id(derive_findings(balanced, {}, probe, {}))
    assert plain["source_probe_lungs_blanked"]["severity"] == "warning"
    assert "0.97" in plain["source_probe_lungs_blanked"]["text"]


def test_seen_unseen_gap_and_saliency_rules():
    evaluation = {"seen_unseen": {"gap": {"auc_seen": 0.95, "auc_unseen": 0.6, "auc_diff": 0.35, "p_value": 0.001}}}
    saliency = {"overall": {"lung_focus_median": 0.1, "lung_area_median": 0.25, "n": 50, "n_empty": 0}}
    found = by_id(derive_findings(evaluation, {}, {}, saliency))
    assert found["seen_unseen_gap"]["severity"] == "shortcut"
    assert found["saliency_outside_lungs"]["severity"] == "warning"
    assert [f["severity"] for f in derive_findings(evaluation, {}, {}, saliency)] == ["shortcut", "warning"]
    assert verdict([]) == "ok"


def test_a_shortcut_planted_at_one_site_is_named_even_when_the_pooled_number_is_diluted():
    ablation = {
        "original": {"auc": ci(0.86, 0.76, 0.94), "per_source_auc": {"site_a": ci(0.99, 0.96, 1.0), "site_b": ci(0.55, 0.34, 0.75)}},
        "lungs_blanked": {
            "auc": ci(0.70, 0.58, 0.80),
            "within_source_auc": ci(0.62, 0.50, 0.74),  # diluted by site_b: not enough on its own
            "per_source_auc": {"site_a": ci(0.97, 0.90, 1.0), "site_b": ci(0.52, 0.30, 0.72)},
        },
        "lungs_only": {"auc": ci(0.49, 0.35, 0.64)},
    }
    found = by_id(derive_findings({}, ablation, {}, {}, "none"))
    outside = found["outside_lung_signal"]
    assert outside["severity"] == "shortcut"
    assert "site_a" in outside["text"] and "site_b" not in outside["text"]
    assert outside["value"] == 0.97
