"""Weight loading: torchvision naming -> our modules, RGB -> gray first conv, our own checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from monai.networks.nets import resnet18 as monai_resnet18
from torch import nn

from covidcxr.errors import CovidCXRError
from covidcxr.models import (
    WeightLoadError,
    create_model,
    load_encoder,
    load_torchvision_state_dict,
    to_torchvision_state_dict,
)
from model_test_utils import TORCHVISION_STATE_DICTS, one_thread, torchvision_densenet121, torchvision_resnet, torchvision_vgg  # noqa: F401


def _clone_head(model):
    return {k: v.clone() for k, v in model.head.state_dict().items()}


@pytest.mark.parametrize("name", sorted(TORCHVISION_STATE_DICTS))
def test_every_torchvision_tensor_lands_on_its_module_and_the_head_is_untouched(name):
    tv = TORCHVISION_STATE_DICTS[name]()
    model = create_model(name, in_channels=1)
    head_before = _clone_head(model)
    report = load_torchvision_state_dict(model, tv)

    own = model.state_dict()
    backbone_keys = [k for k in own if k.startswith("stages.")]
    assert sorted(report.loaded) == sorted(backbone_keys)
    head_prefix = {"resnet18": "fc.", "resnet50": "fc."}.get(name, "classifier.")
    assert report.skipped_head and all(k.startswith(head_prefix) for k in report.skipped_head)
    assert len(report.skipped_head) + len(backbone_keys) == len(tv)
    first_conv = next(k for k in backbone_keys if own[k].ndim == 4)
    assert report.adapted == [first_conv]
    for key in backbone_keys:
        source = tv[model.torchvision_name(key)]
        if key == first_conv:
            assert own[key].shape[1] == 1
            source = source.sum(dim=1, keepdim=True)  # RGB kernel summed for the gray input
        torch.testing.assert_close(own[key], source.to(own[key].dtype), msg=key)
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, head_before[key])


def test_mapping_anchors_match_torchvision_modules():
    """A few named modules, checked by hand (the mapping must not merely be a bijection)."""
    tv = torchvision_resnet(50)
    model = create_model("resnet50")
    load_torchvision_state_dict(model, tv)
    torch.testing.assert_close(model.stages[1][0].conv1.weight, tv["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.stages[4][0].downsample[1].running_var, tv["layer4.0.downsample.1.running_var"])
    torch.testing.assert_close(model.stages[0].bn1.bias, tv["bn1.bias"])

    tv = torchvision_vgg(16)
    model = create_model("vgg16")
    load_torchvision_state_dict(model, tv)
    torch.testing.assert_close(model.stages[1][0].weight, tv["features.5.weight"])  # first conv of block 2
    torch.testing.assert_close(model.stages[4][4].bias, tv["features.28.bias"])  # last conv

    tv = torchvision_densenet121()
    model = create_model("densenet121")
    load_torchvision_state_dict(model, tv)
    torch.testing.assert_close(
        model.stages[1].denseblock1.denselayer1.layers.norm1.weight, tv["features.denseblock1.denselayer1.norm1.weight"]
    )
    torch.testing.assert_close(model.stages[4].norm5.running_mean, tv["features.norm5.running_mean"])

    tv = TORCHVISION_STATE_DICTS["mobilenet_v2"]()
    model = create_model("mobilenet_v2")
    load_torchvision_state_dict(model, tv)
    torch.testing.assert_close(model.stages[0][1].conv[0][0].weight, tv["features.1.conv.0.0.weight"])  # block 1 depthwise
    torch.testing.assert_close(model.stages[4][4][0].weight, tv["features.18.0.weight"])  # last 1x1 conv


def test_summed_rgb_kernel_on_gray_equals_rgb_network_on_replicated_gray():
    """Why the kernel is summed: 1-channel model on x == 3-channel ResNet-18 on [x, x, x]."""
    tv = torchvision_resnet(18)
    gray = create_model("resnet18", in_channels=1).eval()
    load_torchvision_state_dict(gray, tv)
    reference = monai_resnet18(
        spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, bias_downsample=False, feed_forward=False
    ).eval()
    reference.load_state_dict({k: v for k, v in tv.items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        r = reference.maxpool(reference.act(reference.bn1(reference.conv1(x.repeat(1, 3, 1, 1)))))
        r = reference.layer4(reference.layer3(reference.layer2(reference.layer1(r))))
        torch.testing.assert_close(gray.forward_features(x), r, rtol=1e-4, atol=1e-4)


def test_vgg_features_equal_a_torchvision_layout_sequential():
    tv = torchvision_vgg(19, batch_norm=True)
    model = create_model("vgg19", in_channels=3, batch_norm=True).eval()
    report = load_torchvision_state_dict(model, tv)
    assert report.adapted == []  # 3 channels: loaded as is
    layers, channels = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            channels = v
    reference = nn.Sequential(OrderedDict(features=nn.Sequential(*layers))).eval()
    reference.load_state_dict({k: v for k, v in tv.items() if k.startswith("features.")}, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference(x))


def test_missing_extra_and_misshapen_keys_are_listed_in_both_directions():
    tv = torchvision_resnet(18)
    del tv["layer2.1.bn2.running_var"]
    tv["layer5.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    tv["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    model = create_model("resnet18")
    before = model.stages[1][0].conv1.weight.clone()
    with pytest.raises(WeightLoadError) as info:
        load_torchvision_state_dict(model, tv)
    error = info.value
    assert error.missing == ["layer2.1.bn2.running_var"]
    assert error.unexpected == ["layer5.0.conv1.weight"]
    assert len(error.mismatched) == 1 and error.mismatched[0].startswith("layer3.0.conv2.weight")
    message = str(error)
    for text in ("layer2.1.bn2.running_var", "layer5.0.conv1.weight", "layer3.0.conv2.weight", "missing", "unexpected"):
        assert text in message
    assert isinstance(error, CovidCXRError)
    torch.testing.assert_close(model.stages[1][0].conv1.weight, before)  # nothing loaded on error

    report = load_torchvision_state_dict(model, tv, strict_backbone=False)
    assert report.missing == ["layer2.1.bn2.running_var"] and report.unexpected == ["layer5.0.conv1.weight"]
    torch.testing.assert_close(model.stages[1][0].conv1.weight, tv["layer1.0.conv1.weight"])


def test_legacy_densenet_names_file_loading_and_round_trip(tmp_path):
    tv = torchvision_densenet121()
    # torchvision < 0.3 checkpoints: "denselayer1.norm.1.weight", and no num_batches_tracked
    legacy = {
        k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in tv.items() if "num_batches" not in k
    }
    path = tmp_path / "densenet121.pth"
    torch.save(legacy, path)
    model = create_model("densenet121", pretrained=path)  # path -> torch.load(weights_only=True)
    torch.testing.assert_close(
        model.stages[1].denseblock1.denselayer1.layers.norm1.weight, tv["features.denseblock1.denselayer1.norm1.weight"]
    )
    exported = to_torchvision_state_dict(model)
    twin = create_model("densenet121")
    load_torchvision_state_dict(twin, exported)
    for key, value in model.state_dict().items():
        if key.startswith("stages."):
            torch.testing.assert_close(twin.state_dict()[key], value)


def test_networks_without_torchvision_counterpart_refuse():
    with pytest.raises(CovidCXRError, match="no torchvision counterpart"):
        load_torchvision_state_dict(create_model("conv8"), torchvision_resnet(18))


def test_load_encoder_plain_and_lightning_checkpoints_excluding_the_head(tmp_path):
    torch.manual_seed(1)
    pretrained = create_model("resnet18", num_classes=3)  # e.g. a 3-class pneumonia pre-training
    with torch.no_grad():
        for param in pretrained.parameters():
            param.add_(1.0)
    lightning = {
        "epoch": 7,
        "global_step": 70,
        "state_dict": {f"model.{k}": v for k, v in pretrained.state_dict().items()},
        "optimizer_states": [],
    }
    path = tmp_path / "last.ckpt"
    torch.save(lightning, path)
    for source in (path, pretrained.state_dict()):
        model = create_model("resnet18", num_classes=1)
        head_before = _clone_head(model)
        report = load_encoder(model, source)
        assert report.skipped_head and all(".head." in k or k.startswith("head.") for k in report.skipped_head)
        for key, value in pretrained.state_dict().items():
            if key.startswith("stages."):
                torch.testing.assert_close(model.state_dict()[key], value)
        for key, value in model.head.state_dict().items():
            torch.testing.assert_close(value, head_before[key])


def test_load_encoder_architecture_mismatch_is_a_clear_error():
    resnet18_state = create_model("resnet18").state_dict()
    with pytest.raises(WeightLoadError, match="architecture mismatch") as info:
        load_encoder(create_model("resnet50"), resnet18_state)
    assert info.value.missing and info.value.mismatched  # bottleneck conv3/bn3 missing; widths differ
    with pytest.raises(CovidCXRError, match="does not hold a"):
        load_encoder(create_model("resnet18"), create_model("vgg16").state_dict())
    with pytest.raises(WeightLoadError):  # same architecture, other input channels
        load_encoder(create_model("resnet18", in_channels=3), resnet18_state)


def test_create_model_pretrained_detects_our_own_checkpoints(tmp_path):
    source = create_model("conv8", num_classes=3)
    path = tmp_path / "encoder.pt"
    torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model("conv8", pretrained=path)
    torch.testing.assert_close(model.stages[3][0].weight, source.stages[3][0].weight)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own deprecation under torch 2.13
def test_load_encoder_reads_a_real_lightning_checkpoint(tmp_path):
    """A checkpoint written by Lightning's Trainer loads with weights_only=True."""
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, name: str = "conv8", lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.model = create_model(name)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.binary_cross_entropy_with_logits(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32), torch.rand(4, 1))
    trainer = lightning.Trainer(
        max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )  # fmt: skip
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model = create_model("conv8", num_classes=2)
    report = load_encoder(model, tmp_path / "last.ckpt")
    assert report.skipped_head == ["model.head.fc.weight", "model.head.fc.bias"]
    torch.testing.assert_close(model.stages[7][0].weight, module.model.stages[7][0].weight)
    torch.testing.assert_close(model.stages[7][1].running_mean, module.model.stages[7][1].running_mean)
