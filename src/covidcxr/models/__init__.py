"""The model zoo: the CXR classifiers of the papers covidcxr reproduces, behind one API.

Networks (single-channel input by default; ``in_channels`` changes it):

=============  ==========================  =======================================
name           source                      papers (recipe tags)
=============  ==========================  =======================================
resnet18       MONAI ``resnet18``          tartaglione2020
resnet50       MONAI ``resnet50``          benahmed2021 (default), hall2020,
                                           tartaglione2020
densenet121    MONAI ``DenseNet121``       tartaglione2020
vgg16          by hand (MONAI has none)    hall2020 (default), benahmed2021
vgg19          by hand                     apostolopoulos2020
mobilenet_v2   by hand                     apostolopoulos2020
covidnet       by hand (PEPX)              tartaglione2020 (Wang et al.'s design)
conv8          by hand                     tartaglione2020
small_cnn      by hand (approximation)     hall2020
=============  ==========================  =======================================

Every model is a `CXRClassifier`: ``forward_features`` (B, C, H, W) -> (B, F, h, w),
``forward_head`` -> (B, num_classes) logits, ``embed`` -> (B, F), ``stages``,
``gradcam_layer``, ``num_features``, ``default_cfg``.

Speed on the project's CPUs (Xeon with AMX-BF16, 2 cores; ``benchmarks/bench_models.py``):
bf16 autocast + channels_last makes a training step (forward + backward, 224 px, batch 16)
about 3x faster than fp32 NCHW: on one thread ResNet-18 ~10 -> ~35 images/s, DenseNet-121
~3.8 -> ~11, Conv8 ~85 -> ~230. Every model supports it::

    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    loss = loss_fn(logits.float(), target)      # loss in fp32

On a machine whose cores another job keeps busy, ``torch.set_num_threads(1)`` beats the
default 2 threads by 2-5x (OpenMP threads wait on each other at every barrier).

Example:
    >>> from covidcxr.models import create_model, apply_freeze_policy
    >>> model = create_model("resnet50.benahmed2021")          # head GAP-FC64-Dropout-BN-FC
    >>> apply_freeze_policy(model, model.default_cfg["freeze_policy"])["trainable"]
    184449
"""

from covidcxr.models.base import CXRClassifier
from covidcxr.models.freeze import FREEZE_POLICIES, apply_freeze_policy, count_parameters, set_frozen_batchnorm_eval
from covidcxr.models.heads import HEADS, ClassifierHead, build_head, list_heads, register_head
from covidcxr.models.registry import PAPERS, ModelCfg, Recipe, create_model, get_model_cfg, list_models, register_model

# Registration happens on import (one network family per module).
from covidcxr.models import resnet  # noqa: E402,F401
from covidcxr.models import densenet  # noqa: E402,F401
from covidcxr.models import vgg  # noqa: E402,F401
from covidcxr.models import mobilenet  # noqa: E402,F401
from covidcxr.models import covidnet  # noqa: E402,F401
from covidcxr.models import conv8  # noqa: E402,F401
from covidcxr.models import small_cnn  # noqa: E402,F401
from covidcxr.models.weights import (  # noqa: E402
    LoadReport,
    WeightLoadError,
    load_encoder,
    load_pretrained,
    load_torchvision_state_dict,
    to_torchvision_state_dict,
)

__all__ = [
    "FREEZE_POLICIES",
    "HEADS",
    "PAPERS",
    "CXRClassifier",
    "ClassifierHead",
    "LoadReport",
    "ModelCfg",
    "Recipe",
    "WeightLoadError",
    "apply_freeze_policy",
    "build_head",
    "count_parameters",
    "create_model",
    "get_model_cfg",
    "list_heads",
    "list_models",
    "load_encoder",
    "load_pretrained",
    "load_torchvision_state_dict",
    "register_head",
    "register_model",
    "set_frozen_batchnorm_eval",
    "to_torchvision_state_dict",
]
