"""Lung segmentation: post-processing, soft masks, geometry, training, weights round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from covidcxr.errors import CovidCXRError
from covidcxr.preprocess.lungs import (
    DEFAULT_WEIGHTS,
    TTA_PRESETS,
    LungSegmenter,
    SegmenterConfig,
    TTAView,
    build_unet,
    dice_score,
    hd95,
    held_out_rows,
    iou_score,
    mask_convention,
    postprocess_mask,
    prepare_image,
    prepare_mask,
    prepare_view,
    resolve_tta,
    restore_probability,
    save_weights,
    seen_sha1s,
    soften_mask,
)

TINY = SegmenterConfig(input_size=64, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """12 tiny phantoms (64 px) with exact heart-excluded lung masks."""
    from covidcxr.data.sources import load_source
    from covidcxr.data.synth import synthesize

    root = tmp_path_factory.mktemp("phantoms64")
    synthesize(root, n_images=12, size=64, seed=3)
    return root, load_source(root).manifest


def _disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


# ---------------------------------------------------------------- post-processing


def test_postprocess_keeps_exactly_the_two_largest_components_and_fills_holes():
    mask = np.zeros((120, 120), bool)
    mask[10:100, 5:50] = True  # "right lung", 4050 px
    mask[15:95, 65:110] = True  # "left lung", 3600 px
    mask[105:118, 60:75] = True  # a third, smaller blob (195 px): dropped
    mask[2, 2] = mask[117, 117] = True  # specks: dropped
    mask[40:60, 20:30] = False  # a hole (consolidation called "not lung"): filled
    mask[30:35, 80:90] = False  # a hole in the other lung
    result = postprocess_mask(mask)
    labels, count = ndimage.label(result, structure=np.ones((3, 3)))
    assert count == 2
    assert result[40:60, 20:30].all() and result[30:35, 80:90].all()
    assert not result[105:118, 60:75].any() and not result[2, 2] and not result[117, 117]
    assert result.sum() == 90 * 45 + 80 * 45 and result.dtype == bool


def test_postprocess_thresholds_probabilities_and_keeps_empty_masks_empty():
    probability = np.zeros((50, 50), np.float32)
    probability[5:45, 5:20] = 0.8
    probability[5:45, 30:45] = 0.51
    probability[25, 25] = 0.9
    result = postprocess_mask(probability, threshold=0.5)
    assert result.sum() == 2 * 40 * 15
    assert not postprocess_mask(probability, threshold=0.95).any()
    with pytest.raises(CovidCXRError, match="2-D"):
        postprocess_mask(np.zeros((2, 5, 5)))


def test_folding_batch_norms_keeps_the_outputs_and_the_original_network():
    from covidcxr.preprocess.lungs import fold_batch_norms

    torch.manual_seed(0)
    model = build_unet(TINY)
    for module in model.modules():  # trained-looking statistics, not the identity of a fresh BatchNorm
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = fold_batch_norms(model)
    norms = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert norms(folded) == 0 and norms(model) > 0  # the original is untouched
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(folded(x)), torch.sigmoid(model(x)), atol=1e-5)


def test_postprocessing_gives_what_monai_and_scipy_gave():
    """`postprocess_mask` was MONAI's KeepLargestConnectedComponent + SciPy's binary_fill_holes: same masks, faster."""
    from monai.transforms import KeepLargestConnectedComponent

    from covidcxr.preprocess.lungs import fill_holes, keep_largest_components

    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, independent=False, num_components=2)
    rng = np.random.default_rng(3)
    for trial in range(120):
        noise = ndimage.gaussian_filter(rng.random((int(rng.integers(20, 140)), int(rng.integers(20, 140)))), sigma=rng.uniform(0.5, 5))
        mask = noise > np.quantile(noise, rng.uniform(0.2, 0.8))
        reference_kept = np.asarray(keep(mask[None].astype(np.uint8)))[0].astype(bool)
        assert np.array_equal(keep_largest_components(mask, 2), reference_kept), trial
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask)), trial
        assert np.array_equal(postprocess_mask(mask), ndimage.binary_fill_holes(reference_kept)), trial
    assert not fill_holes(np.zeros((4, 4), bool)).any() and fill_holes(np.ones((4, 4), bool)).all()


# ---------------------------------------------------------------- soft masks (Tartaglione et al. §3.2)


def test_soften_mask_is_one_deep_inside_zero_far_outside_and_ramps_within_three_pixels():
    mask = _disk((80, 80), (40, 40), 20)
    soft = soften_mask(mask, radius=3.0)
    assert soft.dtype == np.float32 and soft.shape == mask.shape
    inside = ndimage.distance_transform_edt(mask)  # distance to the nearest outside pixel
    outside = ndimage.distance_transform_edt(~mask)
    # the kernel reaches exactly 3 px (Chebyshev), so >= 3*sqrt(2)+ px away nothing changes
    assert np.all(soft[inside > 4.5] == 1.0)
    assert np.all(soft[outside > 4.5] == 0.0)
    edge_in = (inside > 0) & (inside <= 1)  # the mask's own boundary pixels
    edge_out = (outside > 0) & (outside <= 1)
    # boundary pixels are intermediate: mostly above 0.5 just inside, below 0.5 just outside
    assert np.all((soft[edge_in] > 0.0) & (soft[edge_in] < 1.0)) and soft[edge_in].mean() > 0.5
    assert np.all((soft[edge_out] > 0.0) & (soft[edge_out] < 1.0)) and soft[edge_out].mean() < 0.5
    ramp = (outside > 0) & (outside <= 2.5) | (inside > 0) & (inside <= 2.5)
    assert np.all((soft[ramp] > 0.0) & (soft[ramp] < 1.0))
    assert np.array_equal(soften_mask(mask, radius=0), mask.astype(np.float32))
    with pytest.raises(CovidCXRError):
        soften_mask(mask, radius=-1)


# ---------------------------------------------------------------- geometry and metrics


def test_prepare_and_restore_are_inverse_for_any_aspect_ratio():
    rng = np.random.default_rng(0)
    for shape in ((320, 240), (200, 320), (97, 131)):
        mask = _disk(shape, (shape[0] // 2, shape[1] // 3), min(shape) // 4) | _disk(shape, (shape[0] // 2, 2 * shape[1] // 3), min(shape) // 5)
        image = rng.random(shape).astype(np.float32)
        prepared, placement = prepare_image(image, 64)
        assert prepared.shape == (64, 64) and 0.0 <= prepared.min() and prepared.max() <= 1.0
        assert max(placement.inner) == 64
        small = prepare_mask(mask, placement)
        restored = restore_probability(small.astype(np.float32), placement) > 0.5
        assert restored.shape == shape
        assert dice_score(restored, mask) > 0.93


def test_tta_views_prepare_and_restore_without_cropping():
    rng = np.random.default_rng(2)
    for shape in ((320, 240), (200, 320)):
        image = rng.random(shape).astype(np.float32)
        mask = _disk(shape, (shape[0] // 2, shape[1] // 3), min(shape) // 4)
        # the identity view is exactly the plain preparation
        x, where = prepare_view(image, 64)
        np.testing.assert_array_equal(x, prepare_image(image, 64)[0])
        assert where == prepare_image(image, 64)[1]
        for view in (TTAView(17 / 16), TTAView(15 / 16), TTAView(1.0, (0.125, -0.125))):
            x, where = prepare_view(image, 64, view=view, multiple=16)
            assert x.shape[0] == x.shape[1] and x.shape[0] % 16 == 0 and x.shape[0] >= 64
            top, left = where.offset
            assert top >= 0 and left >= 0 and top + where.inner[0] <= where.size and left + where.inner[1] <= where.size  # nothing cropped
            assert max(where.inner) == round(64 * view.scale)
            small = prepare_mask(mask, where)
            assert dice_score(restore_probability(small.astype(np.float32), where) > 0.5, mask) > 0.9


def test_tta_presets_resolve_and_bad_ones_raise():
    assert resolve_tta(None) == resolve_tta(False) == TTA_PRESETS["none"] == (TTAView(),)
    assert resolve_tta(True) == TTA_PRESETS["multiscale"] and resolve_tta(True, "multiscale3") == TTA_PRESETS["multiscale3"]
    assert resolve_tta([(1.0,), (1.0625, (0.0, 0.03125))]) == (TTAView(), TTAView(1.0625, (0.0, 0.03125)))
    assert all(len({v for v in views}) == len(views) for views in TTA_PRESETS.values())
    with pytest.raises(CovidCXRError, match="flips"):
        resolve_tta("flips")
    with pytest.raises(CovidCXRError, match="preset"):
        SegmenterConfig(tta="flips")


def test_tta_with_the_identity_view_is_the_plain_path_and_views_average(tmp_path):
    torch.manual_seed(2)
    model = build_unet(TINY)
    images = [np.random.default_rng(i).random(shape).astype(np.float32) for i, shape in enumerate(((90, 70), (64, 100)))]
    plain = LungSegmenter(model, TINY, fast=False)
    for identity in ("none", False, [TTAView()]):
        same = LungSegmenter(model, TINY, fast=False, tta=identity)
        for a, b in zip(plain.predict_channels_batch(images), same.predict_channels_batch(images)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(plain.segment_batch(images), same.segment_batch(images)):
            np.testing.assert_array_equal(a, b)
    # several views: the mean of the single-view maps, at each image's own size
    views = TTA_PRESETS["multiscale3_shift"]
    averaged = plain.predict_channels_batch(images, tta=views)
    singles = [plain.predict_channels_batch(images, tta=[v]) for v in views]
    for i, image in enumerate(images):
        assert averaged[i].shape == (2, *image.shape) and averaged[i].dtype == np.float32
        np.testing.assert_allclose(averaged[i], np.mean([s[i] for s in singles], axis=0), atol=1e-6)
    # the per-call tta overrides the segmenter's, and config.tta is the loaded default
    config = SegmenterConfig(**{**TINY.__dict__, "tta": "multiscale"})
    save_weights(model, config, tmp_path / "w")
    loaded = LungSegmenter.load(tmp_path / "w", fast=False)
    assert loaded.tta_views == TTA_PRESETS["multiscale"] and LungSegmenter.load(tmp_path / "w", tta=False).tta_views == (TTAView(),)
    np.testing.assert_array_equal(loaded.predict_probability(images[0], tta="none"), plain.predict_probability(images[0]))
    np.testing.assert_array_equal(loaded.predict_probability(images[0]), plain.predict_probability(images[0], tta="multiscale"))


def test_metrics_on_known_masks():
    a = np.zeros((40, 40), bool)
    a[10:30, 10:30] = True
    b = np.roll(a, 3, axis=0)
    assert dice_score(a, a) == 1.0 and iou_score(a, a) == 1.0 and hd95(a, a) == 0.0
    assert dice_score(a, b) == pytest.approx(2 * 17 * 20 / 800)
    assert iou_score(a, b) == pytest.approx(17 * 20 / (23 * 20))
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(np.zeros_like(a), a) == pytest.approx(np.hypot(40, 40))  # a missed segmentation counts
    assert mask_convention("v7labs") == "retrocardiac" and mask_convention("generalblockchain") == "heart_excluded"


# ---------------------------------------------------------------- training


def test_a_tiny_unet_learns_phantom_lungs(phantoms):
    """A few optimisation steps on tiny phantoms decrease the partial-label Dice+CE loss."""
    from monai.losses import DiceCELoss

    from covidcxr.preprocess.lung_training import decode_rows, partial_dice_ce, split_masked

    _, manifest = phantoms
    rows = split_masked(manifest, seed=0)
    arrays = decode_rows(rows, TINY, show_progress=False)
    assert arrays.images.shape == (len(rows), 1, 64, 64) and arrays.has[:, 0].all() and not arrays.has[:, 1].any()
    torch.manual_seed(0)
    net = build_unet(TINY)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(sigmoid=True)
    images = torch.from_numpy(arrays.images)
    labels = torch.from_numpy(arrays.labels).float()
    has = torch.from_numpy(arrays.has)
    losses = []
    for _ in range(12):
        loss = partial_dice_ce(loss_fn, net(images), labels, has)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_split_is_patient_disjoint_and_stratified_by_annotator(phantoms):
    from covidcxr.data.splits import check_leakage
    from covidcxr.preprocess.lung_training import split_masked

    _, manifest = phantoms
    rows = split_masked(manifest, seed=0)
    check_leakage(rows)
    assert set(rows["split"]) == {"train", "val", "test"}
    assert rows.equals(split_masked(manifest, seed=0))  # reproducible


# ---------------------------------------------------------------- weights on disk


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_unet(TINY)
    image = np.random.default_rng(1).random((90, 70)).astype(np.float32)
    path = save_weights(model, TINY, tmp_path / "w", metadata={"note": "test"})
    assert path.name == "lung_unet.pt" and path.with_suffix(".json").is_file()
    for fast in (False, True):
        same = build_unet(TINY)
        same.load_state_dict(model.state_dict())
        original = LungSegmenter(same, TINY, fast=fast)  # fast folds the BatchNorms of its own copy
        loaded = LungSegmenter.load(tmp_path / "w", fast=fast)
        assert loaded.metadata["note"] == "test" and loaded.config == TINY
        np.testing.assert_array_equal(original.predict_probability(image), loaded.predict_probability(image))
        np.testing.assert_array_equal(original.segment(image), loaded.segment(image))
    probability = loaded.predict_probability(image)
    assert probability.shape == (90, 70) and probability.dtype == np.float32
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    batch = loaded.segment_batch([image, image[:50]])
    assert [m.shape for m in batch] == [(90, 70), (50, 70)] and batch[0].dtype == bool


def test_bad_weights_paths_raise_a_clear_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "lung_unet.pt"
    with pytest.raises(CovidCXRError, match=str(missing)):
        LungSegmenter.load(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    corrupt.with_suffix(".json").write_text(json.dumps({"config": TINY.to_dict()}))
    with pytest.raises(CovidCXRError, match="corrupt.pt"):
        LungSegmenter.load(corrupt)
    orphan = tmp_path / "orphan.pt"
    torch.save(build_unet(TINY).state_dict(), orphan)
    with pytest.raises(CovidCXRError, match="orphan.json"):
        LungSegmenter.load(orphan)
    wrong = tmp_path / "wrong.pt"
    torch.save(build_unet(TINY).state_dict(), wrong)
    wrong.with_suffix(".json").write_text(json.dumps({"config": {**TINY.to_dict(), "channels": [8, 16, 32]}}))
    with pytest.raises(CovidCXRError, match="wrong.pt"):
        LungSegmenter.load(wrong)


def test_held_out_selection_excludes_train_and_val_images(phantoms):
    _, manifest = phantoms
    rows = manifest.head(6)
    seen = seen_sha1s({"split": {"train_val_sha1": rows["sha1"].tolist()[:4]}})
    kept, excluded = held_out_rows(rows, seen)
    assert excluded == 4 and kept["image"].tolist() == rows["image"].tolist()[4:]


# ---------------------------------------------------------------- the shipped weights


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"the shipped lung U-Net weights are not at {DEFAULT_WEIGHTS}")
def test_shipped_weights_segment_an_unseen_phantom(tmp_path):
    from covidcxr.data.sources import load_source
    from covidcxr.data.synth import synthesize
    from covidcxr.io import read_image, read_mask

    synthesize(tmp_path, n_images=3, size=256, seed=11)
    manifest = load_source(tmp_path).manifest
    segmenter = LungSegmenter.load()
    assert segmenter.input_size == 256 and segmenter.conventions[0] == "heart_excluded"
    images = [read_image(p).pixels for p in manifest["image"]]
    masks = segmenter.segment_batch(images)
    scores = [dice_score(m, read_mask(p, m.shape)) for m, p in zip(masks, manifest["mask"])]
    assert min(scores) > 0.8, scores
    # test-time augmentation (shipped default: off) gives a valid two-lung mask too
    assert segmenter.tta_views == TTA_PRESETS["none"]
    tta_masks = LungSegmenter.load(tta=True).segment_batch(images)
    for image, mask, truth in zip(images, tta_masks, manifest["mask"]):
        assert mask.shape == image.shape and mask.dtype == bool
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 2
        assert np.array_equal(mask, ndimage.binary_fill_holes(mask))
        assert dice_score(mask, read_mask(truth, mask.shape)) > 0.8


@pytest.mark.shared_data
@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"the shipped lung U-Net weights are not at {DEFAULT_WEIGHTS}")
def test_shipped_split_selects_exactly_the_held_out_patients(shared_collection):
    from covidcxr.data.sources import load_source
    from covidcxr.preprocess.lungs import read_metadata

    metadata = read_metadata()
    manifest = load_source(shared_collection).manifest
    rows = manifest[manifest["mask"].notna()]
    kept, excluded = held_out_rows(rows, seen_sha1s(metadata))
    test = metadata["split"]["test"]
    assert len(kept) == len(test) and excluded == len(rows) - len(test)
    assert set(kept["sha1"]) == {item["sha1"] for item in test}
    train_patients = set(manifest.loc[manifest["sha1"].isin(seen_sha1s(metadata)), "patient_id"])
    assert not train_patients & {item["patient_id"] for item in test}
