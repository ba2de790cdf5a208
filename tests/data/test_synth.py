"""Tests of the synthetic phantom generator: exact masks, findings in the lungs, sites in the
acquisition, the planted shortcut outside the lungs, and a deterministic, loadable folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from covidcxr.data.manifest import MANIFEST_COLUMNS, file_sha1
from covidcxr.data.sources import load_source
from covidcxr.data.synth import (
    DEFAULT_SITES,
    ShortcutSpec,
    SiteProfile,
    plan_synthesis,
    render_phantom,
    render_phantom_detailed,
    synthesize,
)

SIZE = 96
SITE_A, SITE_B, SITE_C = DEFAULT_SITES


def _pair(seed, site, size=SIZE, **kwargs):
    """The same rng state rendered twice: once as given, once as a plain normal film."""
    base = render_phantom_detailed(np.random.default_rng(seed), size, "normal", site)
    other = render_phantom_detailed(np.random.default_rng(seed), size, site=site, **kwargs)
    return base, other


def _blur_reach(site, size=SIZE):
    """How far (px) the acquisition blur can carry a change: 3 sigma, plus one pixel."""
    return int(np.ceil(3 * site.blur_sigma * size / 256)) + 1


def _lung_halves(diff, mask):
    """Share of ``diff`` in the lower half and the peripheral half of each lung, and in the
    lung that holds the most."""
    labels, n = ndimage.label(mask)
    assert n == 2
    rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
    lower = peripheral = 0.0
    per_lung = []
    for k in (1, 2):
        lung = labels == k
        r, c = np.nonzero(lung)
        row_mid, col_mid = (r.min() + r.max()) / 2, (c.min() + c.max()) / 2
        outer = cols < col_mid if c.mean() < mask.shape[1] / 2 else cols > col_mid
        d = diff * lung
        lower += d[rows > row_mid].sum()
        peripheral += d[outer].sum()
        per_lung.append(d.sum())
    total = diff[mask].sum()
    return lower / total, peripheral / total, max(per_lung) / total


# --- masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("site", DEFAULT_SITES, ids=lambda s: s.name)
def test_masks_are_two_plausible_lungs_darker_than_the_mediastinum(site):
    for i, label in enumerate(["normal", "covid", "pneumonia", "other"] * 2):
        image, mask = render_phantom(np.random.default_rng([1, i]), SIZE, label, site)
        assert image.shape == mask.shape == (SIZE, SIZE)
        assert image.dtype == np.float32 and mask.dtype == bool
        assert 0.0 <= image.min() and image.max() <= 1.0
        labels, n = ndimage.label(mask)  # 4-connectivity: the strictest reading
        assert n == 2, f"{site.name} #{i}: {n} components"
        centres = [np.nonzero(labels == k)[1].mean() for k in (1, 2)]
        assert min(centres) < SIZE / 2 < max(centres), "one lung on each side"
        assert 0.12 <= mask.mean() <= 0.40, f"lung area {mask.mean():.3f}"
        # Mediastinum: between the two lungs, on rows where both are present.
        between = np.zeros_like(mask)
        for row in range(SIZE):
            cols = np.nonzero(mask[row])[0]
            left, right = cols[cols < SIZE / 2], cols[cols >= SIZE / 2]
            if len(left) and len(right):
                between[row, left.max() + 2 : right.min() - 1] = True
        assert image[between].mean() > image[mask].mean() + 0.1


def test_mask_edge_is_where_the_image_gets_dark():
    # No blur or noise, a loose, shifted, rotated framing: the mask must still follow the image.
    sharp = SiteProfile("sharp", noise_sigma=0.0, blur_sigma=0.0, field_of_view=0.85, offset_jitter=12.0)
    for i in range(6):
        image, mask = render_phantom(np.random.default_rng([2, i]), 128, "normal", sharp)
        inner = mask & ~ndimage.binary_erosion(mask)
        outer = ndimage.binary_dilation(mask) & ~mask
        assert image[outer].mean() > image[inner].mean() + 0.08


def test_follow_up_films_share_the_lungs():
    from covidcxr.data.synth import sample_anatomy

    def overlap(a, b):
        return (a & b).sum() / (a | b).sum()

    anatomy = sample_anatomy(np.random.default_rng(4))
    other = sample_anatomy(np.random.default_rng(5))
    # same pose (same acquisition stream): the patient's anatomy alone decides the lungs
    _, first = render_phantom(np.random.default_rng(10), SIZE, "covid", SITE_A, anatomy=anatomy, view="PA", severity=0.1)
    _, again = render_phantom(np.random.default_rng(10), SIZE, "covid", SITE_A, anatomy=anatomy, view="PA", severity=0.2)
    _, stranger = render_phantom(np.random.default_rng(10), SIZE, "covid", SITE_A, anatomy=other, view="PA")
    assert np.array_equal(first, again)
    assert overlap(first, stranger) < 0.95
    # another pose of the same chest still overlaps strongly
    _, moved = render_phantom(np.random.default_rng(11), SIZE, "covid", SITE_A, anatomy=anatomy, view="PA")
    assert overlap(first, moved) > 0.7  # shift, rotation, ±3% magnification


# --- findings ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["covid", "pneumonia", "other"])
def test_findings_lie_inside_the_lungs(label):
    for i in range(6):
        site = DEFAULT_SITES[i % 3]
        base, sick = _pair([3, i], site, label=label)
        assert np.array_equal(base.mask, sick.mask), "a finding must not move the lungs"
        diff = np.abs(sick.image - base.image)
        assert np.percentile(diff[sick.mask], 99) > 0.02, "the finding should be visible"
        near_lung = ndimage.binary_dilation(sick.mask, iterations=_blur_reach(site))
        assert diff[near_lung].sum() >= 0.95 * diff.sum()
        assert not sick.finding_map[~sick.mask].any()
        assert 0.05 <= sick.severity <= 0.2


def test_finding_zones_follow_the_label():
    shares = {"covid": [], "pneumonia": [], "other": []}
    for label in shares:
        for i in range(6):
            base, sick = _pair([4, i], DEFAULT_SITES[i % 3], label=label)
            shares[label].append(_lung_halves(np.abs(sick.image - base.image), base.mask))
    covid = np.mean(shares["covid"], axis=0)
    assert covid[0] > 0.7 and covid[1] > 0.75, f"covid should be lower-zone and peripheral, got {covid}"
    assert max(s[2] for s in shares["covid"]) < 0.95, "covid is bilateral"
    assert np.mean([s[2] for s in shares["pneumonia"]]) > 0.9, "pneumonia is unilateral"
    assert np.mean([s[0] for s in shares["other"]]) < 0.2, "the TB-like pattern is upper-zone"


def test_label_changes_only_the_finding_stream():
    base, sick = _pair(5, SITE_B, label="covid")
    outside = ~ndimage.binary_dilation(base.mask, iterations=_blur_reach(SITE_B))
    assert np.array_equal(base.image[outside], sick.image[outside])
    assert base.view == sick.view and sick.finding.startswith("synthetic:")


# --- sites ------------------------------------------------------------------------------


def test_sites_differ_in_acquisition_more_than_within():
    features = {}
    for site in DEFAULT_SITES:
        rows = []
        for i in range(8):
            image, _ = render_phantom(np.random.default_rng([6, i]), SIZE, "normal", site)
            high_pass = image - ndimage.gaussian_filter(image, 1.0)
            rows.append((image.mean(), high_pass.std()))
        features[site.name] = np.array(rows)
    names = list(features)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            fa, fb = features[names[a]], features[names[b]]
            gap = np.abs(fa.mean(0) - fb.mean(0))
            spread = fa.std(0) + fb.std(0)
            assert (gap > spread).any(), f"{names[a]} vs {names[b]}: gap {gap}, spread {spread}"
    means = {name: f[:, 0].mean() for name, f in features.items()}
    assert len({round(m, 2) for m in means.values()}) == 3


def test_site_profile_validates():
    with pytest.raises(ValueError, match="label_mix"):
        SiteProfile("bad", label_mix={"covid": 0.5})
    with pytest.raises(ValueError, match="unknown labels"):
        SiteProfile("bad", label_mix={"flu": 1.0})
    with pytest.raises(ValueError, match="site name"):
        SiteProfile("a:b")
    with pytest.raises(ValueError, match="kind"):
        ShortcutSpec("sticker")
    with pytest.raises(ValueError, match="shortcut_kind"):
        render_phantom(np.random.default_rng(0), SIZE, "covid", SITE_A, shortcut_applied=True)
    with pytest.raises(ValueError, match="label"):
        render_phantom(np.random.default_rng(0), SIZE, "flu", SITE_A)


# --- shortcut ---------------------------------------------------------------------------


@pytest.mark.parametrize("site", DEFAULT_SITES, ids=lambda s: s.name)
def test_marker_lies_only_outside_the_lungs(site):
    for i in range(4):
        plain = render_phantom_detailed(np.random.default_rng([7, i]), SIZE, "covid", site)
        marked = render_phantom_detailed(np.random.default_rng([7, i]), SIZE, "covid", site, True, "marker")
        changed = plain.image != marked.image
        assert changed.sum() >= 20, "the marker should be drawn"
        assert not (changed & ~marked.marker_mask).any(), "only marker pixels change"
        assert not (changed & ndimage.binary_dilation(plain.mask, iterations=2)).any()
        assert np.array_equal(plain.mask, marked.mask)
        assert marked.image[changed].mean() > 0.9 and marked.shortcut and not plain.shortcut


def test_window_shortcut_shifts_the_global_window():
    plain = render_phantom_detailed(np.random.default_rng(8), SIZE, "covid", SITE_A)
    shifted = render_phantom_detailed(np.random.default_rng(8), SIZE, "covid", SITE_A, True, "window")
    assert shifted.image.mean() > plain.image.mean() + 0.05
    assert np.ptp(shifted.image) < np.ptp(plain.image)
    assert np.array_equal(plain.mask, shifted.mask) and not shifted.marker_mask.any()


def test_plan_plants_the_shortcut_at_the_requested_rates():
    spec = ShortcutSpec("marker", site="site_c", strength=0.9, false_rate=0.05)
    plan = plan_synthesis(3000, shortcut=spec, seed=1)
    at_c = plan[plan["site"] == "site_c"]
    covid_rate = at_c.loc[at_c["label"] == "covid", "shortcut"].mean()
    other_rate = at_c.loc[at_c["label"] != "covid", "shortcut"].mean()
    assert 0.86 <= covid_rate <= 0.94
    assert 0.02 <= other_rate <= 0.08
    assert not plan.loc[plan["site"] != "site_c", "shortcut"].any()
    none = plan_synthesis(3000, shortcut=None, seed=1)
    assert not none["shortcut"].any()
    # Switching the shortcut on changes nothing but the shortcut column.
    cols = [c for c in plan.columns if c != "shortcut"]
    assert plan[cols].equals(none[cols])
    # Sites keep their class balance.
    covid_share = plan.groupby("site")["label"].apply(lambda s: (s == "covid").mean())
    assert covid_share["site_c"] > covid_share["site_a"] + 0.2


def test_marker_corner_is_a_real_shortcut(tmp_path):
    spec = ShortcutSpec("marker", site=None, strength=0.9, false_rate=0.05)
    manifest = synthesize(tmp_path / "sc", n_images=48, size=128, shortcut=spec, seed=2)
    # The feature: mean of the marker corner, minus the opposite corner (both are air, so
    # the difference cancels each site's own background level).
    corner = []
    for path in manifest["image"]:
        pixels = np.asarray(Image.open(path), dtype=np.float32) / 255.0
        corner.append(pixels[:12, -24:].mean() - pixels[:12, :24].mean())
    corner = np.array(corner)
    carries = manifest["shortcut"].to_numpy(bool)
    assert 0 < carries.sum() < len(carries)
    # Threshold from even rows, accuracy on odd rows: a one-number "model".
    fit_c, fit_y = corner[::2], carries[::2]
    assert fit_y.any() and (~fit_y).any()
    threshold = (fit_c[fit_y].mean() + fit_c[~fit_y].mean()) / 2
    accuracy = ((corner[1::2] > threshold) == carries[1::2]).mean()
    assert accuracy > 0.9
    # ... and that number predicts the label: the shortcut is correlated with covid.
    is_covid = (manifest["label"] == "covid").to_numpy()
    assert ((corner > threshold) == is_covid).mean() > 0.8


# --- the written folder -----------------------------------------------------------------


def test_synthesize_writes_a_deterministic_loadable_collection(tmp_path):
    calls = []
    first = synthesize(tmp_path / "a", n_images=21, size=64, seed=3, progress=calls.append)
    again = synthesize(tmp_path / "b", n_images=21, size=64, seed=3)
    other = synthesize(tmp_path / "c", n_images=21, size=64, seed=4)
    assert calls == [1] * 21
    assert list(first["sha1"]) == list(again["sha1"])
    assert set(first["sha1"]).isdisjoint(other["sha1"])

    table = load_source(tmp_path / "a")
    loaded = table.manifest
    assert table.rejected == []
    assert len(loaded) == 21
    assert list(loaded.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert {"shortcut", "synthetic"} <= set(loaded.columns)
    assert loaded["synthetic"].all() and not loaded["shortcut"].any()
    assert loaded.groupby("source").size().to_dict() == {"site_a": 7, "site_b": 7, "site_c": 7}
    assert loaded["mask"].notna().all()
    assert (loaded["patient_id"].value_counts() == 2).any(), "some patients have a follow-up film"
    assert all(p.split(":")[0] == s for p, s in zip(loaded["patient_id"], loaded["source"]))
    assert set(loaded["view"]) <= {"PA", "AP"} and set(loaded["sex"]) <= {"M", "F"}
    assert loaded["dup_group"].isna().all() and loaded["age"].between(18, 95).all()
    for row in loaded.itertuples():
        assert file_sha1(row.image) == row.sha1
        mask = np.asarray(Image.open(row.mask))
        assert set(np.unique(mask)) <= {0, 255} and ndimage.label(mask > 0)[1] == 2
    # Follow-up films keep the patient's label.
    assert (loaded.groupby("patient_id")["label"].nunique() == 1).all()

    config = json.loads((tmp_path / "a" / "synth_config.json").read_text())
    assert config["seed"] == 3 and config["n_images"] == 21 and config["shortcut"] is None
    assert "site_a" in (tmp_path / "a" / "README.md").read_text()


def test_synthesize_resumes_and_refuses_other_parameters(tmp_path):
    out = tmp_path / "p"
    full = synthesize(out, per_site=4, size=64, seed=5)
    assert len(full) == 12
    for name in list(full["image"])[:3]:
        (out / "images" / name.rsplit("/", 1)[-1]).unlink()
    (out / "manifest.csv").unlink()
    resumed = synthesize(out, per_site=4, size=64, seed=5)
    assert resumed.equals(full)
    with pytest.raises(FileExistsError):
        synthesize(out, per_site=4, size=64, seed=6)
    redrawn = synthesize(out, per_site=3, size=64, seed=6, overwrite=True)
    assert len(redrawn) == 9 and len(list((out / "images").glob("*.png"))) == 9
    with pytest.raises(ValueError, match="not both"):
        synthesize(tmp_path / "q", n_images=3, per_site=1)


def test_view_shortcut_confounds_the_projection_with_the_label_and_adds_no_pixel():
    spec = ShortcutSpec("view", site="site_a", strength=0.9, false_rate=0.05)
    plan = plan_synthesis(1500, shortcut=spec, seed=2)
    at_a = plan[plan["site"] == "site_a"]
    is_ap = at_a["view"] == "AP"
    assert 0.85 <= is_ap[at_a["label"] == "covid"].mean() <= 0.95
    assert is_ap[at_a["label"] != "covid"].mean() <= 0.10
    assert (is_ap == at_a["shortcut"]).all()
    # the other sites keep their own view mix, and nothing else in the plan moves
    none = plan_synthesis(1500, shortcut=None, seed=2)
    others = plan["site"] != "site_a"
    assert plan.loc[others, "view"].equals(none.loc[others, "view"])
    cols = [c for c in plan.columns if c not in ("shortcut", "view")]
    assert plan[cols].equals(none[cols])
    # an AP film differs from the PA film of the same draw (magnified heart, clavicles), with no marker
    pa = render_phantom_detailed(np.random.default_rng(5), SIZE, "normal", SITE_A, view="PA")
    ap = render_phantom_detailed(np.random.default_rng(5), SIZE, "normal", SITE_A, True, "view")
    assert ap.view == "AP" and not ap.marker_mask.any()
    assert np.abs(ap.image - pa.image).mean() > 0.01
    with pytest.raises(ValueError, match="shortcut kind"):
        ShortcutSpec("stripes")


def test_finding_scale_strengthens_only_the_finding(tmp_path):
    base = synthesize(tmp_path / "x1", n_images=12, size=32, seed=4)
    strong = synthesize(tmp_path / "x2", n_images=12, size=32, seed=4, finding_scale=2.0)
    assert list(base["label"]) == list(strong["label"])
    ill = (base["severity"] > 0).to_numpy()
    assert ill.any() and (~ill).any()
    np.testing.assert_allclose(strong["severity"][ill], 2 * base["severity"][ill], rtol=1e-4)
    for a, b, sick in zip(base["image"], strong["image"], ill):
        same = np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert same != sick  # normal films are byte-identical; only the finding changes
    assert json.loads((tmp_path / "x2" / "synth_config.json").read_text())["finding_scale"] == 2.0
    assert "finding_scale" not in json.loads((tmp_path / "x1" / "synth_config.json").read_text())
    with pytest.raises(ValueError, match="finding_scale"):
        synthesize(tmp_path / "x3", n_images=12, size=32, finding_scale=0.0)
