"""Two-stage training (pretrain on pneumonia, fine-tune on COVID) and freeze policies through the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from covidcxr.errors import CovidCXRError
from covidcxr.models import count_parameters
from covidcxr.train import recipe_from_mapping, train_recipe
from covidcxr.train.module import CXRClassifierModule
from covidcxr.train.run import initialize_pretrained
from generated_data import tiny_train_recipe


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("two_stage")


def _pretrain_dict(root: Path) -> dict:
    return tiny_train_recipe(
        root,
        "pretrain",
        data={"synthetic": {"n_images": 90, "size": 64, "seed": 1}, "task": "pneumonia_vs_normal", "split": {"test_size": 0.2, "val_size": 0.25}},
    )


@pytest.fixture(scope="module")
def pretrained_run(root: Path):
    return train_recipe(recipe_from_mapping(_pretrain_dict(root)), progress=False, say=_quiet)


def _backbone(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "stages.")}


def test_finetune_loads_the_pretrained_encoder(root: Path, pretrained_run) -> None:
    assert pretrained_run.metrics["task"] == "pneumonia_vs_normal"
    recipe = recipe_from_mapping(tiny_train_recipe(root, "finetune", model={"name": "conv8", "arch_kwargs": {"width": 8}, "pretrained": str(pretrained_run.run_dir)}))
    module = CXRClassifierModule(recipe.resolved())
    info = initialize_pretrained(module.model, recipe, say=_quiet)
    assert info is not None and info["kind"] == "run" and info["source"].endswith("best.ckpt") and info["loaded"] > 0
    saved = torch.load(pretrained_run.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    expected = _backbone(saved, "model.")
    mine = _backbone(module.model.state_dict())
    assert expected.keys() == mine.keys()
    for key in expected:
        assert torch.equal(expected[key], mine[key]), key


def test_finetune_with_frozen_backbone_keeps_the_encoder(root: Path, pretrained_run) -> None:
    recipe = tiny_train_recipe(
        root, "finetune-frozen", model={"name": "conv8", "arch_kwargs": {"width": 8}, "pretrained": str(pretrained_run.run_dir), "freeze": "backbone"}
    )
    result = train_recipe(recipe_from_mapping(recipe), progress=False, say=_quiet)
    assert result.metrics["pretrained"]["loaded"] > 0 and result.metrics["task"] == "covid_vs_rest"
    before = torch.load(pretrained_run.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    after = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in _backbone(before, "model.").items():
        # weights and BatchNorm running statistics: frozen BN stays in eval mode
        assert torch.equal(value, after["model." + key]), key
    head = [k for k in after if k.startswith("model.head.") and k.endswith("weight")]
    assert head and not any(k in before and before[k].shape == after[k].shape and torch.equal(before[k], after[k]) for k in head)


def test_pretrained_recipe_yaml_is_trained_first_or_reused(root: Path, pretrained_run, tmp_path: Path) -> None:
    stage_one = tmp_path / "pretrain.yaml"
    stage_one.write_text(yaml.safe_dump(_pretrain_dict(root)))
    messages: list[str] = []
    recipe = recipe_from_mapping(tiny_train_recipe(root, "finetune-yaml", model={"name": "conv8", "arch_kwargs": {"width": 8}, "pretrained": str(stage_one)}))
    info = initialize_pretrained(CXRClassifierModule(recipe.resolved()).model, recipe, say=messages.append)
    assert any("not retrained" in m for m in messages)  # the finished pretraining run is reused
    assert info["source"] == str(pretrained_run.run_dir / "checkpoints" / "best.ckpt")


def test_architecture_mismatch_is_a_clear_error(root: Path, pretrained_run) -> None:
    recipe = recipe_from_mapping(tiny_train_recipe(root, "mismatch", model={"name": "resnet18", "arch_kwargs": {}, "pretrained": str(pretrained_run.run_dir)}))
    with pytest.raises(CovidCXRError, match="trained conv8.*builds resnet18"):
        initialize_pretrained(CXRClassifierModule(recipe.resolved()).model, recipe, say=_quiet)
    recipe = recipe_from_mapping(tiny_train_recipe(root, "absent", model={"pretrained": str(root / "nothing-here")}))
    with pytest.raises(CovidCXRError, match="model.pretrained"):
        initialize_pretrained(CXRClassifierModule(recipe.resolved()).model, recipe, say=_quiet)


@pytest.mark.parametrize(
    ("model", "freeze", "check"),
    [
        ("resnet18", "none", lambda m, c: c["trainable"] == c["total"]),
        ("resnet18", "backbone", lambda m, c: c["trainable"] == sum(p.numel() for p in m.head.parameters())),
        (
            "resnet18",
            "all_but_batchnorm",
            lambda m, c: c["trainable"]
            == sum(p.numel() for p in m.head.parameters())
            + sum(p.numel() for mod in m.stages.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters()),
        ),
        ("resnet18", {"trainable_last_stages": 1}, lambda m, c: all(p.requires_grad for p in m.stages[-1].parameters()) and not any(p.requires_grad for p in m.stages[0].parameters())),
        ("conv8", {"layer_cutoff": 4}, lambda m, c: [p.requires_grad for p in m.stages[0].parameters()] == [False] * 3 and all(p.requires_grad for p in m.stages[2].parameters())),
    ],
)
def test_freeze_policies_apply_through_the_recipe(tmp_path: Path, model: str, freeze, check) -> None:
    arch = {"width": 8} if model == "conv8" else {}
    recipe = recipe_from_mapping(tiny_train_recipe(tmp_path, model={"name": model, "arch_kwargs": arch, "freeze": freeze}))
    module = CXRClassifierModule(recipe.resolved())
    counts = count_parameters(module.model)
    assert check(module.model, counts), counts
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == counts["trainable"]


def test_bad_architecture_arguments_name_the_field(tmp_path: Path) -> None:
    recipe = recipe_from_mapping(tiny_train_recipe(tmp_path, model={"name": "resnet18", "arch_kwargs": {"width": 8}}))
    with pytest.raises(CovidCXRError, match="model.arch_kwargs"):
        CXRClassifierModule(recipe.resolved())


def test_paper_default_freeze_policy() -> None:
    recipe = recipe_from_mapping({"data": {"synthetic": {}}, "model": {"name": "resnet50.benahmed2021", "freeze": "default"}})
    module = CXRClassifierModule(recipe.resolved())
    assert count_parameters(module.model)["trainable"] == 184_449  # Ben Ahmed et al.: "184K"
