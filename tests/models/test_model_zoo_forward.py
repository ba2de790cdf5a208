"""Every registered network: the common API, shapes, bf16 + channels_last, gradients, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covidcxr.models import CXRClassifier, count_parameters, create_model, list_models
from model_test_utils import one_thread  # noqa: F401  (autouse fixture)

ALL_MODELS = list_models()
EXPECTED = {"resnet18", "resnet50", "densenet121", "vgg16", "vgg19", "mobilenet_v2", "covidnet", "conv8", "small_cnn"}


def test_every_requested_network_is_registered():
    assert EXPECTED <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_common_api_shapes_bf16_channels_last_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_channels=1)
    assert isinstance(model, CXRClassifier)
    x = torch.randn(2, 1, 64, 64)

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        embedding = model.embed(x)
    assert features.ndim == 4 and features.shape[:2] == (2, model.num_features)
    assert logits.shape == (2, 3)
    assert embedding.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), logits)
    # the last stage is what Grad-CAM hooks: its output is the feature map
    assert model.get_submodule(model.gradcam_layer) is model.stages[-1]
    assert len(model.stages) >= 4 and model.default_cfg["name"] == name

    # channels_last + bf16 autocast, training mode, gradients reach every head parameter
    model.train()
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_cl)
        emb = model.embed(x_cl)
    assert out.shape == (2, 3) and emb.shape == (2, model.num_features)
    assert torch.isfinite(out.float()).all()
    loss = F.cross_entropy(out.float(), torch.tensor([0, 2]))
    loss.backward()
    for pname, param in model.head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.head.parameters())
    first_conv = next(p for n, p in model.backbone_named_parameters() if p.ndim == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_resnet18_parameter_count_matches_the_architecture():
    """1 input channel, 1 logit, linear head: conv/BN/FC parameters counted by hand."""

    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    def basic(cin, cout, stride):
        n = conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
        if stride != 1 or cin != cout:
            n += conv(cin, cout, 1) + bn(cout)
        return n

    blocks = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    expected = conv(1, 64, 7) + bn(64) + sum(basic(*b) for b in blocks) + 512 * 1 + 1
    assert expected == 11_170_753  # torchvision's 11,689,512 minus 2 RGB input planes (6,272) and 999 classes (512,487)
    model = create_model("resnet18", num_classes=1, in_channels=1, head="linear")
    assert count_parameters(model) == {"total": expected, "trainable": expected}


def test_resnet_first_convolution_has_stride_2_so_224_px_gives_7x7():
    model = create_model("resnet18").eval()
    assert model.stages[0].conv1.stride == (2, 2) and model.stages[0].conv1.kernel_size == (7, 7)
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, 224, 224)).shape == (1, 512, 7, 7)


def test_three_channel_input_and_multiclass():
    model = create_model("small_cnn", num_classes=3, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert model.default_cfg["input_size"] == (3, 224, 224)


def test_covidnet_width_multiplier_scales_widths():
    half = create_model("covidnet", width_mult=0.5, head="linear")
    full = create_model("covidnet", head="linear")
    assert (half.num_features, full.num_features) == (216, 424)
    assert count_parameters(half)["total"] < count_parameters(full)["total"] / 3  # ~ width^2
    # PEPX: projection -> expansion -> depthwise 3x3 -> projection -> extension
    pepx = full.stages[1].pepx[0]
    assert [name for name, _ in pepx.named_children()] == ["projection1", "expansion", "depthwise", "projection2", "extension"]
    dw = pepx.depthwise[0]
    assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)


def test_vgg_batch_norm_is_optional_and_off_by_default():
    plain = create_model("vgg16")
    with_bn = create_model("vgg16", batch_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.stages.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.stages.modules()) == 13
