"""Registry, metadata (default_cfg), paper recipes and heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models import (
    PAPERS,
    build_head,
    create_model,
    get_model_cfg,
    list_heads,
    list_models,
)
from model_test_utils import one_thread  # noqa: F401


def test_unknown_model_lists_the_known_names():
    with pytest.raises(CovidCXRError) as info:
        create_model("nope")
    message = str(info.value)
    assert "unknown model 'nope'" in message
    for name in list_models():
        assert name in message
    with pytest.raises(CovidCXRError, match=r"resnet50\.benahmed2021"):
        create_model("resnet50.nope2020")


def test_list_models_by_paper():
    assert list_models(paper="hall2020") == ["resnet50", "small_cnn", "vgg16"]
    assert list_models(paper="apostolopoulos2020") == ["mobilenet_v2", "vgg19"]
    assert list_models(paper="tartaglione2020") == ["conv8", "covidnet", "densenet121", "resnet18", "resnet50"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_complete_metadata(name):
    cfg = get_model_cfg(name)
    assert cfg["name"] == name and cfg["input_size"] == (1, 224, 224)
    assert cfg["paper"] in PAPERS and cfg["citation"] == PAPERS[cfg["paper"]]
    assert cfg["recipes"][cfg["paper"]]["head"] in list_heads()
    assert cfg["architecture"] and cfg["layer_definition"]


def test_paper_tags_select_head_and_freeze_policy():
    model = create_model("resnet50.hall2020", in_channels=1)
    cfg = model.default_cfg
    assert (cfg["paper"], cfg["head"], cfg["freeze_policy"]) == ("hall2020", "hall", "backbone")
    assert "Hall LO" in cfg["citation"] and cfg["num_features"] == 2048 and cfg["gradcam_layer"] == "stages.4"
    assert [type(m) for m in model.head.mlp] == [nn.Linear, nn.ReLU, nn.Dropout]
    assert model.head.mlp[0].out_features == 64

    # a head named explicitly takes the model's paper setting for it
    vgg = create_model("vgg19", head="apostolopoulos")
    assert vgg.default_cfg["head_kwargs"] == {"hidden": (1024,)}
    assert [type(m) for m in vgg.head.mlp] == [nn.Linear, nn.ReLU]
    mobile = create_model("mobilenet_v2", head="apostolopoulos", num_classes=3)
    assert [type(m) for m in mobile.head.mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert (mobile.head.mlp[0].out_features, mobile.head.mlp[3].out_features, mobile.head.fc.out_features) == (1000, 750, 3)
    # and head_kwargs override it
    custom = create_model("resnet18", head="hall", head_kwargs={"hidden": 32, "dropout": 0.2})
    assert custom.head.mlp[0].out_features == 32 and custom.head.mlp[2].p == 0.2


def test_benahmed_head_layout_and_size():
    head = build_head("benahmed", in_features=2048, num_classes=1)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.BatchNorm1d]
    assert head.mlp[2].p == 0.5
    assert sum(p.numel() for p in head.parameters()) == 131_329


def test_head_errors_and_flatten_pooling():
    with pytest.raises(CovidCXRError, match="known heads: .*benahmed"):
        create_model("resnet18", head="mystery")
    with pytest.raises(CovidCXRError, match="head 'hall'"):
        build_head("hall", 8, 1, hiden=3)
    head = build_head("linear", 8, 2, pool="flatten", feature_hw=(2, 2))
    assert head.fc.in_features == 32
    assert head(torch.zeros(1, 8, 2, 2)).shape == (1, 2)
    with pytest.raises(CovidCXRError, match="input size differs"):
        head(torch.zeros(1, 8, 3, 3))
    with pytest.raises(CovidCXRError, match="feature_hw"):
        build_head("linear", 8, 2, pool="flatten")


def test_custom_module_head_reset_head_and_pretrained_true():
    model = create_model("small_cnn", head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 2)))
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 2)
    model.reset_head("linear", num_classes=4)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4) and model.default_cfg["num_classes"] == 4
    with pytest.raises(CovidCXRError, match="never does"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(CovidCXRError, match="does not exist"):
        create_model("resnet18", pretrained="/nonexistent/weights.pth")
