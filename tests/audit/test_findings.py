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


def test_a_lungs_only_drop_contradicted_by_the_blanked_ablation_is_info():
    # a clean phantom model: lungs-only inputs are unlike its training images, so its AUC falls,
    # but with the lungs blanked it is at chance: nothing usable lies outside the lungs
    ablation = {
        "original": {"auc": ci(0.79, 0.68, 0.88)},
        "lungs_blanked": {"auc": ci(0.52, 0.41, 0.64), "within_source_auc": ci(0.52, 0.41, 0.64)},
        "lungs_only": {"auc": ci(0.47, 0.36, 0.58)},
    }
    found = by_id(derive_findings({}, ablation, {}, {}, "none"))
    assert found["outside_lung_signal"]["severity"] == "ok"
    assert found["lungs_only"]["severity"] == "info" and "0.47 [0.36, 0.58]" in found["lungs_only"]["text"]


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


SKILLED = {"overall": {"auc": ci(0.90, 0.84, 0.95), "n_images": 120, "n_patients": 80}}
SAME_MIX = {"positive_rate": {"site_a": 0.5, "site_b": 0.5}, "differs": False}
OTHER_MIX = {"positive_rate": {"site_a": 0.8, "site_b": 0.1}, "differs": True}


def test_a_readable_source_is_a_warning_only_where_the_label_mix_differs():
    probe = {"lungs_blanked": {"balanced_accuracy": ci(0.97, 0.95, 0.99), "chance": 1 / 3, "n_sources": 3}}
    same = by_id(derive_findings(SKILLED, {}, probe, {}, label_mix=SAME_MIX))["source_probe_lungs_blanked"]
    assert same["severity"] == "info" and "same label mix" in same["text"]
    other = by_id(derive_findings(SKILLED, {}, probe, {}, label_mix=OTHER_MIX))["source_probe_lungs_blanked"]
    assert other["severity"] == "warning" and "site_a 80%" in other["text"]


def test_probe_wording_follows_the_interval_not_the_lower_bound():
    # the "not reliably predictable ... 0.78 [0.70, 0.86]": an interval spanning the bar is inconclusive
    probe = {"full": {"balanced_accuracy": ci(0.78, 0.50, 0.86), "chance": 0.5, "n_sources": 2}}
    found = by_id(derive_findings(SKILLED, {}, probe, {}, label_mix=OTHER_MIX))["source_probe_full"]
    assert found["severity"] == "info" and "inconclusive" in found["text"] and "not readable" not in found["text"]
    probe = {"full": {"balanced_accuracy": ci(0.55, 0.48, 0.62), "chance": 0.5, "n_sources": 2}}
    found = by_id(derive_findings(SKILLED, {}, probe, {}))["source_probe_full"]
    assert found["severity"] == "ok" and "clearly below 0.70" in found["text"]


def test_no_skill_is_said_first_and_nothing_else_is_ok():
    evaluation = {"overall": {"auc": ci(0.42, 0.30, 0.55), "n_images": 40, "n_patients": 30}, "source_only": ci(0.5, 0.4, 0.6)}
    ablation = {"original": {"auc": ci(0.42, 0.30, 0.55)}, "lungs_blanked": {"within_source_auc": ci(0.5, 0.4, 0.6)}, "lungs_only": {"auc": ci(0.45, 0.3, 0.6)}}
    found = derive_findings(evaluation, ablation, {}, {})
    assert found[0]["id"] == "skill" and found[0]["severity"] == "no_skill"
    assert "0.42 [0.30, 0.55]" in found[0]["text"] and "includes chance" in found[0]["text"]
    assert "ok" not in {f["severity"] for f in found}
    assert verdict(found) == "no_skill"


def test_a_clean_skilled_model_can_be_called_ok():
    evaluation = {**SKILLED, "source_only": ci(0.5, 0.45, 0.55), "within_source": {**ci(0.89, 0.82, 0.94), "sources": ["site_a", "site_b"]}}
    ablation = {
        "original": {"auc": ci(0.90, 0.84, 0.95)},
        "lungs_blanked": {"within_source_auc": ci(0.52, 0.42, 0.62), "per_source_auc": {"site_a": ci(0.55, 0.40, 0.70)}},
        "lungs_only": {"auc": ci(0.88, 0.80, 0.94)},
    }
    probe = {"full": {"balanced_accuracy": ci(0.9, 0.85, 0.95), "chance": 0.5, "n_sources": 2}}
    saliency = {"overall": {"lung_focus_median": 0.7, "lung_area_median": 0.25, "n": 50, "n_empty": 0}}
    found = derive_findings(evaluation, ablation, probe, saliency, label_mix=SAME_MIX)
    assert verdict(found) == "ok", found
    assert by_id(found)["saliency_outside_lungs"]["severity"] == "info"  # saliency never earns OK
    assert "weak evidence" in by_id(found)["saliency_outside_lungs"]["text"]


def test_unseen_sources_are_domain_shift_not_a_source_shortcut():
    # the demo's case: seen sites 0.82 within source; the unseen site drags a pooled number down
    evaluation = {
        **SKILLED,
        "within_source": {**ci(0.82, 0.72, 0.90), "sources": ["site_a", "site_b"]},
        "within_source_unseen": {**ci(0.50, 0.40, 0.60), "sources": ["site_c"]},
        "seen_unseen": {
            "unseen_sources": ["site_c"],
            "seen": {"auc": ci(0.84, 0.75, 0.91), "n_images": 60, "n_patients": 40},
            "unseen": {"auc": ci(0.50, 0.40, 0.60), "n_images": 150, "n_patients": 100},
            "gap": {"auc_seen": 0.84, "auc_unseen": 0.50, "auc_diff": 0.34, "p_value": 0.001},
        },
    }
    found = by_id(derive_findings(evaluation, {}, {}, {}))
    assert found["within_source_auc"]["severity"] == "ok" and "0.82 [0.72, 0.90]" in found["within_source_auc"]["text"]
    unseen = found["unseen_sources"]
    assert unseen["severity"] == "warning" and "domain shift" in unseen["text"] and "site_c" in unseen["text"]
    assert "0.50 [0.40, 0.60]" in unseen["text"]
    assert "shortcut" not in {f["severity"] for f in found.values()}


def test_saliency_mostly_outside_the_lungs_is_never_ok():
    # the case: focus above the lung area's share, yet most maps mostly outside the lungs
    saliency = {"overall": {"lung_focus_median": 0.35, "lung_area_median": 0.25, "share_mostly_outside": 0.92, "n": 50, "n_empty": 0}}
    found = by_id(derive_findings(SKILLED, {}, {}, saliency))["saliency_outside_lungs"]
    assert found["severity"] == "warning" and "92% [81%, 97%]" in found["text"] and "weak evidence" in found["text"]


def test_saliency_warns_only_when_clear_and_not_contradicted_by_the_ablation():
    mostly_out = {"overall": {"lung_focus_median": 0.35, "lung_area_median": 0.25, "share_mostly_outside": 0.92, "n": 50, "n_empty": 0}}
    # with the lungs blanked the model is at chance: the maps' spill-over is contradicted
    at_chance = {"original": {"auc": ci(0.80, 0.70, 0.88)}, "lungs_blanked": {"auc": ci(0.52, 0.42, 0.62), "n_images": 50}}
    found = by_id(derive_findings(SKILLED, at_chance, {}, mostly_out))
    assert found["outside_lung_signal"]["severity"] == "ok"
    assert found["saliency_outside_lungs"]["severity"] == "info" and "contradicts" in found["saliency_outside_lungs"]["text"]
    # 7 of 12 maps outside: 58% [32%, 81%] is not clearly a majority
    few = {"overall": {"lung_focus_median": 0.45, "lung_area_median": 0.25, "share_mostly_outside": 7 / 12, "n": 12, "n_empty": 0}}
    found = by_id(derive_findings(SKILLED, {}, {}, few))["saliency_outside_lungs"]
    assert found["severity"] == "info" and "58% [32%, 81%]" in found["text"] and "not clearly more than half" in found["text"]
    # lungs masked by the preprocessing: nothing outside them reaches the model
    found = by_id(derive_findings(SKILLED, {}, {}, mostly_out, lungs_mode="mask"))["saliency_outside_lungs"]
    assert found["severity"] == "info" and "masks the lungs" in found["text"]


def test_confounder_findings_metadata_and_view():
    confounders = {
        "metadata_only": {**ci(0.80, 0.72, 0.87), "features": ["view", "sex", "age_band"], "n_images": 100, "n_patients": 70},
        "view_dependence": {**ci(0.85, 0.75, 0.93), "views": ["AP", "PA"], "label_view_association": ci(0.6, 0.5, 0.7)},
    }
    found = by_id(derive_findings(SKILLED, {}, {}, {}, confounders=confounders))
    assert found["metadata_only"]["severity"] == "warning" and "0.80 [0.72, 0.87]" in found["metadata_only"]["text"]
    assert found["view_dependence"]["severity"] == "shortcut" and "AP" in found["view_dependence"]["text"]
    weak_model = {"overall": {"auc": ci(0.75, 0.65, 0.84)}}
    assert by_id(derive_findings(weak_model, {}, {}, {}, confounders=confounders))["metadata_only"]["severity"] == "shortcut"
    flat = {"view_dependence": {**ci(0.52, 0.42, 0.62), "views": ["AP", "PA"], "label_view_association": ci(0.0, -0.1, 0.1)}}
    assert by_id(derive_findings(SKILLED, {}, {}, {}, confounders=flat))["view_dependence"]["severity"] == "ok"


def test_intensity_window_dependence_is_a_shortcut_only_when_decisive():
    strong = {"windows": {"brighter_flatter": {"description": "brighter", "flip_rate": ci(0.45, 0.35, 0.55), "shift_auc": ci(0.95, 0.90, 0.99)}}}
    mild = {"windows": {"brighter_flatter": {"description": "brighter", "flip_rate": ci(0.05, 0.02, 0.09), "shift_auc": ci(0.60, 0.52, 0.68)}}}
    assert by_id(derive_findings(SKILLED, {}, {}, {}, intensity=strong))["intensity_window"]["severity"] == "shortcut"
    assert by_id(derive_findings(SKILLED, {}, {}, {}, intensity=mild))["intensity_window"]["severity"] == "ok"
    # the phantom case: the decisive window is not the one with the largest shift
    both = {"windows": {
        "brighter_flatter": {"description": "brighter", "flip_rate": ci(0.51, 0.42, 0.60), "shift_auc": ci(0.94, 0.91, 0.97)},
        "darker_steeper": {"description": "darker", "flip_rate": ci(0.03, 0.01, 0.07), "shift_auc": ci(0.03, 0.01, 0.05)},
    }}
    found = by_id(derive_findings(SKILLED, {}, {}, {}, intensity=both))["intensity_window"]
    assert found["severity"] == "shortcut" and "brighter" in found["text"]
    clean = {"windows": {"brighter_flatter": {"description": "brighter", "flip_rate": ci(0.21, 0.15, 0.29), "shift_auc": ci(0.93, 0.89, 0.96)}}}
    assert by_id(derive_findings(SKILLED, {}, {}, {}, intensity=clean))["intensity_window"]["severity"] == "warning"


def test_every_interval_phrase_agrees_with_its_interval():
    import re

    evaluation = {**SKILLED, "within_source": {**ci(0.60, 0.45, 0.75), "sources": ["a", "b"]}, "source_only": ci(0.5, 0.4, 0.6)}
    ablation = {"original": {"auc": ci(0.9, 0.84, 0.95)}, "lungs_blanked": {"within_source_auc": ci(0.58, 0.51, 0.66)}, "lungs_only": {"auc": ci(0.88, 0.8, 0.94)}}
    probe = {"full": {"balanced_accuracy": ci(0.78, 0.70, 0.86), "chance": 0.5, "n_sources": 2}}
    pattern = re.compile(r"(\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\][^.;:]*?(clearly above|clearly below|includes)[^(]*\((\d\.\d\d)")
    checked = 0
    for finding in derive_findings(evaluation, ablation, probe, {}):
        for _est, low, high, word, bar in pattern.findall(finding["text"]):
            low, high, bar = float(low), float(high), float(bar)
            checked += 1
            if word == "clearly above":
                assert low > bar, finding["text"]
            elif word == "clearly below":
                assert high < bar, finding["text"]
            else:
                assert low <= bar <= high, finding["text"]
    assert checked >= 3



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


def test_a_window_that_gives_the_label_away_is_a_shortcut_unless_the_model_clearly_beats_it():
    def baseline(base, diff):
        return {"baseline": {**base, "n_images": 128, "n_patients": 96}, "model": ci(0.90, 0.84, 0.95), "difference": diff}

    def finding(part):
        return by_id(derive_findings(SKILLED, {}, {}, {}, intensity_baseline=part))["label_from_intensity"]

    window = finding(baseline(ci(0.92, 0.86, 0.97), ci(-0.02, -0.10, 0.06)))
    assert window["severity"] == "shortcut" and "0.92 [0.86, 0.97]" in window["text"] and "not clearly above" in window["text"]
    assert finding(baseline(ci(0.80, 0.72, 0.88), ci(0.10, 0.04, 0.16)))["severity"] == "warning"
    assert finding(baseline(ci(0.50, 0.40, 0.60), ci(0.40, 0.30, 0.50)))["severity"] == "ok"
    # an estimate past the bar with an interval reaching chance is no evidence of a usable window
    assert finding(baseline(ci(0.72, 0.49, 0.90), ci(0.10, -0.05, 0.25)))["severity"] == "info"
    assert finding({"skipped": "fewer than 2 patients of a class among the audited images"})["severity"] == "info"


def test_a_lungs_only_drop_without_clear_skill_is_never_called_not_clearly_below():
    """Full-image AUC not clearly above 0.60 and lungs-only clearly lower: info, and the sentence says 'clearly below'."""
    ablation = {"original": {"auc": ci(0.70, 0.58, 0.80)}, "lungs_blanked": {"auc": ci(0.7, 0.6, 0.8)}, "lungs_only": {"auc": ci(0.42, 0.30, 0.55)}}
    found = by_id(derive_findings({}, ablation, {}, {}, "none"))
    assert found["lungs_only"]["severity"] == "info"
    assert "clearly below 0.60" in found["lungs_only"]["text"] and "not clearly below" not in found["lungs_only"]["text"]
