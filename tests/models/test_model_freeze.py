"""Freeze policies: which parameters train, layer cutoffs, frozen BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models import apply_freeze_policy, count_parameters, create_model, set_frozen_batchnorm_eval
from model_test_utils import one_thread  # noqa: F401


def _numel(params):
    return sum(p.numel() for p in params)


def _head_numel(model):
    return _numel(model.head.parameters())


def test_ben_ahmed_finetune1_has_184449_trainable_parameters():
    model = create_model("resnet50.benahmed2021", num_classes=1, in_channels=1)
    head = _head_numel(model)
    backbone_bn = _numel(
        p for m in model.stages.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)
    )
    assert (head, backbone_bn) == (131_329, 53_120)  # 2048*64+64 + 2*64 + 64+1 ; 2 x 26,560 BN channels
    counts = apply_freeze_policy(model, model.default_cfg["freeze_policy"])
    assert model.default_cfg["freeze_policy"] == "all_but_batchnorm"
    assert counts["trainable"] == 184_449 == head + backbone_bn
    assert counts == count_parameters(model)
    for name, param in model.named_parameters():
        in_bn = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)
        assert param.requires_grad == (name.startswith("head.") or in_bn), name


def test_none_backbone_and_last_stages_policies():
    model = create_model("resnet18", head="linear")
    total = count_parameters(model)["total"]
    assert apply_freeze_policy(model, "none") == {"total": total, "trainable": total}
    assert apply_freeze_policy(model, "backbone")["trainable"] == _head_numel(model) == 513
    last = apply_freeze_policy(model, {"trainable_last_stages": 1})["trainable"]
    assert last == 513 + _numel(model.stages[4].parameters())
    two = apply_freeze_policy(model, {"trainable_last_stages": 2})["trainable"]
    assert two == last + _numel(model.stages[3].parameters())
    assert apply_freeze_policy(model, {"trainable_last_stages": 0})["trainable"] == 513
    assert apply_freeze_policy(model, {"trainable_last_stages": 5})["trainable"] == total
    # policies are absolute: "none" after a freeze unfreezes everything
    assert apply_freeze_policy(model, None)["trainable"] == total
    with pytest.raises(CovidCXRError, match=r"0\.\.5"):
        apply_freeze_policy(model, {"trainable_last_stages": 6})
    with pytest.raises(CovidCXRError, match="unknown freeze policy"):
        apply_freeze_policy(model, "everything")
    with pytest.raises(CovidCXRError, match="unknown freeze policy"):
        apply_freeze_policy(model, {"freeze": 3})


def test_apostolopoulos_vgg19_cutoff_18_counts_keras_layers():
    model = create_model("vgg19.apostolopoulos2020")
    layers = model.layer_sequence()
    assert len(layers) == 22  # input + 16 conv + 5 pool, as Keras VGG19(include_top=False).layers
    assert len(create_model("vgg16").layer_sequence()) == 19
    assert "block5_conv1" in layers[17][0]
    counts = apply_freeze_policy(model, model.default_cfg["freeze_policy"])
    trainable_convs = [n for n, m in model.stages.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert trainable_convs == ["4.2", "4.4", "4.6"]  # block5_conv2..4 (conv, relu, conv, ...)
    assert counts["trainable"] == 3 * (512 * 512 * 9 + 512) + _head_numel(model)
    # the parametrised definition (convolutions only here) would freeze all 16 convolutions
    counts = apply_freeze_policy(model, {"layer_cutoff": 16, "count": "parametrised"})
    assert counts["trainable"] == _head_numel(model)
    with pytest.raises(CovidCXRError, match=r"0\.\.22"):
        apply_freeze_policy(model, {"layer_cutoff": 23})


def test_apostolopoulos_mobilenet_v2_cutoff_10_freezes_stem_and_first_block():
    model = create_model("mobilenet_v2.apostolopoulos2020")
    layers = model.layer_sequence()
    assert len(layers) == 155  # keras-applications 1.0.8 MobileNetV2(include_top=False)
    names = [n for n, _ in layers]
    assert names[:10] == [
        "input_1", "Conv1_pad", "Conv1", "bn_Conv1", "Conv1_relu", "expanded_conv_depthwise",
        "expanded_conv_depthwise_BN", "expanded_conv_depthwise_relu", "expanded_conv_project", "expanded_conv_project_BN",
    ]  # fmt: skip
    assert names[-3:] == ["Conv_1", "Conv_1_bn", "out_relu"]
    # every parametrised backbone module appears exactly once in the Keras list
    listed = [id(m) for _, m in layers if m is not None]
    parametrised = [id(m) for _, m in model.layer_sequence("parametrised")]
    assert sorted(listed) == sorted(parametrised) and len(set(listed)) == len(listed)

    counts = apply_freeze_policy(model, model.default_cfg["freeze_policy"])
    frozen = counts["total"] - counts["trainable"]
    assert frozen == (32 * 1 * 9 + 64) + (32 * 9 + 64) + (16 * 32 + 32)  # Conv1+BN, depthwise+BN, project+BN
    assert not model.stages[0][1].conv[2].weight.requires_grad and model.stages[1][0].conv[0][0].weight.requires_grad


def test_parametrised_layer_cutoff_on_resnet():
    model = create_model("resnet18", head="linear")
    counts = apply_freeze_policy(model, {"layer_cutoff": 2})  # conv1 and bn1
    assert counts["total"] - counts["trainable"] == 64 * 49 + 2 * 64
    with pytest.raises(CovidCXRError, match="keras"):
        model.layer_sequence("keras")


def test_frozen_batchnorm_keeps_eval_mode_and_running_statistics():
    torch.manual_seed(0)
    model = create_model("resnet18.tartaglione2020")
    apply_freeze_policy(model, "backbone")
    model.train()
    frozen_bn = model.stages[0].bn1
    assert not frozen_bn.training and model.head.training
    before = frozen_bn.running_mean.clone()
    model(torch.randn(2, 1, 64, 64))
    torch.testing.assert_close(frozen_bn.running_mean, before)

    # Ben Ahmed's Finetune1: BatchNorm trainable -> train mode, statistics adapt to X-rays
    apply_freeze_policy(model, "all_but_batchnorm")
    model.train()
    assert frozen_bn.training
    model(torch.randn(2, 1, 64, 64))
    assert not torch.equal(frozen_bn.running_mean, before)

    # the helper for training loops that call train() on a parent module
    apply_freeze_policy(model, "backbone", frozen_bn_eval=False)
    model.train()
    assert frozen_bn.training
    names = set_frozen_batchnorm_eval(model)
    assert "stages.0.bn1" in names and not frozen_bn.training
    assert not any(n.startswith("head.") for n in names)
