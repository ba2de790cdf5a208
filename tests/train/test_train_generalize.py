"""Generalization methods as recipe options: acquisition randomization, label-source decorrelation,
source-adversarial training (gradient reversal) and GroupDRO — each shown to do what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.errors import CovidCXRError
from covidcxr.train import RecipeError, recipe_from_mapping, train_recipe
from covidcxr.train.augment import AcquisitionRandomizer, RandDownUpSample, RandEqualize, RandJPEG, RandPoissonNoise, acquisition_transforms
from covidcxr.train.data import EpochSampler, sample_weights
from covidcxr.train.domain import GroupDRO, SourceAdversary, ganin_lambda, grad_reverse
from covidcxr.train.recipe import AcquisitionSection
from generated_data import tiny_train_recipe


def _phantom_batch(n: int = 3, size: int = 48) -> torch.Tensor:
    from covidcxr.data.synth import DEFAULT_SITES, render_phantom

    images = [render_phantom(np.random.default_rng(i), size, "covid", DEFAULT_SITES[i % 3])[0] for i in range(n)]
    return torch.as_tensor(np.stack(images)[:, None], dtype=torch.float32)


# ---------------------------------------------------------------------------- recipe schema


def test_recipe_admits_acquisition_and_refuses_geometry(tmp_path: Path) -> None:
    base = tiny_train_recipe(tmp_path)
    recipe = recipe_from_mapping({**base, "augmentation": {"hflip": 0.5, "acquisition": {"gamma": [0.8, 1.2], "jpeg_quality": None}}})
    assert recipe.augmentation.acquisition.gamma == (0.8, 1.2) and recipe.augmentation.acquisition.jpeg_quality is None
    for bad in ({"elastic": 1.0}, {"scaling": 0.1}, {"acquisition": {"elastic": True}}, {"acquisition": {"zoom": 0.2}}):
        with pytest.raises(RecipeError, match="not allowed"):
            recipe_from_mapping({**base, "augmentation": bad})
    with pytest.raises(RecipeError, match="low <= high"):
        recipe_from_mapping({**base, "augmentation": {"acquisition": {"gamma": [1.5, 0.7]}}})


def test_default_generalization_options_leave_the_config_hash_alone(tmp_path: Path) -> None:
    plain = recipe_from_mapping(tiny_train_recipe(tmp_path))
    identity = plain.identity()
    assert "domain" not in identity and "acquisition" not in identity["augmentation"] and "single_label_sources" not in identity["train"]
    with_domain = recipe_from_mapping({**tiny_train_recipe(tmp_path), "domain": {"group_dro": {"eta": 0.1}}})
    assert with_domain.config_hash() != plain.config_hash()


# ---------------------------------------------------------------------------- acquisition randomization


@pytest.mark.parametrize(
    "transform",
    [
        RandPoissonNoise(prob=1.0, counts=(50.0, 100.0)),
        RandJPEG(prob=1.0, quality=(5, 20)),
        RandDownUpSample(prob=1.0, factor=(0.2, 0.4)),
        RandEqualize(prob=1.0),
        *acquisition_transforms(AcquisitionSection(prob=1.0, sharpen=True)),
    ],
    ids=lambda t: type(t).__name__,
)
def test_each_acquisition_transform_changes_the_image_within_bounds_and_is_seeded(transform) -> None:
    image = _phantom_batch(1)[0]
    transform.set_random_state(seed=7)
    first = torch.as_tensor(transform(image.clone())).float().clamp(0, 1)
    transform.set_random_state(seed=7)
    again = torch.as_tensor(transform(image.clone())).float().clamp(0, 1)
    assert first.shape == image.shape
    assert torch.equal(first, again), "same seed, same draw"
    changed = (first - image).abs()
    assert changed.max() > 1e-3, "the transform changed the image"
    assert changed.mean() < 0.35, "within bounds: the radiograph stays recognisable"


def test_randomizer_on_a_batch_is_deterministic_bounded_and_keeps_geometry() -> None:
    batch = _phantom_batch(4)
    randomizer = AcquisitionRandomizer(AcquisitionSection(prob=1.0))
    out = randomizer(batch, seed=11)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, randomizer(batch, seed=11))
    assert not torch.equal(out, randomizer(batch, seed=12))
    # intensity changes only, every one of them stacked: the image still correlates with itself
    correlation = np.corrcoef(out.flatten().numpy(), batch.flatten().numpy())[0, 1]
    assert correlation > 0.5, correlation


# ---------------------------------------------------------------------------- decorrelation


def test_source_label_weights_give_every_source_the_same_label_mix() -> None:
    sources = np.array(["a"] * 80 + ["b"] * 20 + ["c"] * 30)
    targets = np.array([1] * 70 + [0] * 10 + [1] * 5 + [0] * 15 + [0] * 30)  # a COVID-rich, b mostly normal, c normal only
    weights = sample_weights(sources, targets, "source_label")
    frame = pd.DataFrame({"source": sources, "target": targets, "w": weights})
    per_source = frame.groupby("source")["w"].sum()
    assert np.allclose(per_source.to_numpy(), 1 / 3)
    mix = frame[frame["source"].isin(["a", "b"])].groupby(["source", "target"])["w"].sum().unstack()
    assert np.allclose(mix[1] / (mix[0] + mix[1]), 0.5), "each two-label source is 50/50 in the draw"
    # single-label source c kept out of the loss
    weights = sample_weights(sources, targets, "source_label", "exclude")
    assert weights[sources == "c"].sum() == 0 and np.isclose(weights.sum(), 1.0)
    frame["w"] = weights
    assert np.isclose(frame.loc[frame["target"] == 1, "w"].sum(), 0.5), "and then the classes are balanced overall"
    with pytest.raises(CovidCXRError, match="single label"):
        sample_weights(np.array(["x", "y"]), np.array([0, 1]), "source_label", "exclude")
    assert sample_weights(sources, targets, "none") is None


def test_sampler_draws_follow_the_weights() -> None:
    sources = np.array(["a"] * 90 + ["b"] * 10)
    targets = np.array([1] * 80 + [0] * 10 + [0] * 10)
    weights = sample_weights(sources, targets, "sampler", "exclude")  # b (all negatives) excluded
    sampler = EpochSampler(targets, balanced=False, seed=0, weights=weights)
    drawn = np.array(sampler.order(0) + sampler.order(1))
    assert not np.isin(drawn, np.arange(90, 100)).any()
    assert 0.4 < targets[drawn].mean() < 0.6


# ---------------------------------------------------------------------------- gradient reversal and GroupDRO


def test_gradient_reversal_flips_the_gradient_sign() -> None:
    torch.manual_seed(0)
    features = torch.randn(6, 8, requires_grad=True)
    head = SourceAdversary(8, 3, hidden=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.nn.functional.cross_entropy(head.net(features), labels).backward()
    plain = features.grad.clone()
    features.grad = None
    torch.nn.functional.cross_entropy(head(features, 0.5), labels).backward()
    assert torch.allclose(features.grad, -0.5 * plain, atol=1e-6)
    assert ganin_lambda(0.0, 2.0) == 0.0 and ganin_lambda(1.0, 2.0) == pytest.approx(2.0, abs=1e-3)
    assert ganin_lambda(0.3, 2.0, schedule="constant") == 2.0
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x * 2, 1.0).sum().backward()
    assert x.grad.tolist() == [-2.0, -2.0, -2.0]


def test_group_dro_weights_shift_to_the_worst_group() -> None:
    dro = GroupDRO(n_groups=3, eta=0.5)
    losses = torch.tensor([0.2, 0.2, 1.5, 1.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2])
    for _ in range(20):
        loss = dro(losses, groups)
    q = dro.q
    assert int(q.argmax()) == 1 and q[1] > 0.9 and torch.isclose(q.sum(), torch.tensor(1.0))
    assert float(loss) > float(losses.mean()), "the robust loss leans towards the worst group"
    dro.eval()
    before = dro.q.clone()
    dro(losses, groups)
    assert torch.equal(before, dro.q), "no update outside training"


# ---------------------------------------------------------------------------- end to end


def test_all_methods_train_together_at_256_px(tmp_path: Path) -> None:
    recipe = tiny_train_recipe(
        tmp_path,
        "generalize",
        data={"synthetic": {"n_images": 40, "size": 256, "seed": 2}, "task": "covid_vs_rest", "split": {"test_size": 0.25, "val_size": 0.25}},
        preprocess={"cache_dir": str(tmp_path / "cache"), "size": 256, "mask_source": "manifest", "lungs": "none", "workers": 1},
        train={"epochs": 1, "batch_size": 8, "checkpoint_every_n_steps": 0, "balancing": "source_label", "single_label_sources": "exclude", "monitor": "val_loss"},
        augmentation={"hflip": 0.5, "acquisition": {"prob": 0.5}},
        domain={"adversarial": {"weight": 0.5}, "group_dro": {"eta": 0.05}},
    )
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=lambda _: None)
    assert result.status == "trained" and result.metrics["status"] == "complete"
    checkpoint = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    assert any(k.startswith("adversary.") for k in state) and "group_dro.q" in state
    q = state["group_dro.q"]
    assert torch.isclose(q.sum(), torch.tensor(1.0)) and not torch.allclose(q, torch.full_like(q, 1 / len(q))), "GroupDRO moved its weights"
    assert checkpoint["covidcxr"]["train_sources"] == ["site_a", "site_b", "site_c"]
    from covidcxr.train.inference import load_run

    run = load_run(result.run_dir)
    assert run.input_size == (256, 256) and run.predict(np.zeros((1, 256, 256), dtype=np.float32)).shape == (1,)
    # longer training resumes from last.ckpt: the source head and GroupDRO's weights come back
    longer = recipe_from_mapping({**recipe, "train": {**recipe["train"], "epochs": 2}})
    resumed = train_recipe(longer, progress=False, say=lambda _: None)
    assert resumed.status == "resumed" and resumed.metrics["epochs_trained"] == 2
