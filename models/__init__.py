"""Model zoo: teachers and students for CIFAR knowledge-distillation experiments.

Usage::

    from models import build, names
    net = build("resnet32x4", num_classes=100)

Every model maps an ``(N, 3, H, W)`` image batch (H = W = 32 or 64) to logits of
shape ``(N, num_classes)``; nothing else is returned. RepDistiller spellings such
as ``wrn_40_2`` or ``ShuffleV2`` are accepted through :data:`ALIASES`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

from torch import nn

from . import cnn as _cnn
from . import mobilenetv2 as _mobilenetv2
from . import resnet as _resnet
from . import resnet_cifar as _resnet_cifar
from . import shufflenetv2 as _shufflenetv2
from . import wrn as _wrn

__all__ = ["ALIASES", "MODELS", "build", "count_parameters", "describe", "names", "stages"]

# name -> (constructor taking num_classes, one-line description)
_ZOO: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "resnet8": (_resnet_cifar.resnet8, "CIFAR ResNet-8 (He et al. 2016), 3 stages 16/32/64, n=1"),
    "resnet14": (_resnet_cifar.resnet14, "CIFAR ResNet-14, 3 stages 16/32/64, n=2"),
    "resnet20": (_resnet_cifar.resnet20, "CIFAR ResNet-20, 3 stages 16/32/64, n=3"),
    "resnet32": (_resnet_cifar.resnet32, "CIFAR ResNet-32, 3 stages 16/32/64, n=5"),
    "resnet44": (_resnet_cifar.resnet44, "CIFAR ResNet-44, 3 stages 16/32/64, n=7"),
    "resnet56": (_resnet_cifar.resnet56, "CIFAR ResNet-56, 3 stages 16/32/64, n=9"),
    "resnet110": (_resnet_cifar.resnet110, "CIFAR ResNet-110, 3 stages 16/32/64, n=18"),
    "resnet8x4": (_resnet_cifar.resnet8x4, "CIFAR ResNet-8 at 4x width (stem 32, stages 64/128/256)"),
    "resnet32x4": (_resnet_cifar.resnet32x4, "CIFAR ResNet-32 at 4x width (stem 32, stages 64/128/256)"),
    "resnet18": (_resnet.resnet18, "ResNet-18 for CIFAR: 3x3 stem, no max-pool, BasicBlock [2,2,2,2]"),
    "resnet34": (_resnet.resnet34, "ResNet-34 for CIFAR: 3x3 stem, no max-pool, BasicBlock [3,4,6,3]"),
    "resnet50": (_resnet.resnet50, "ResNet-50 for CIFAR: 3x3 stem, no max-pool, Bottleneck [3,4,6,3]"),
    "wrn16_1": (_wrn.wrn16_1, "Wide ResNet WRN-16-1 (Zagoruyko & Komodakis 2016), pre-activation"),
    "wrn16_2": (_wrn.wrn16_2, "Wide ResNet WRN-16-2, pre-activation"),
    "wrn40_1": (_wrn.wrn40_1, "Wide ResNet WRN-40-1, pre-activation"),
    "wrn40_2": (_wrn.wrn40_2, "Wide ResNet WRN-40-2, pre-activation"),
    "wrn28_10": (_wrn.wrn28_10, "Wide ResNet WRN-28-10, pre-activation"),
    "cnn": (_cnn.cnn, "Plain CNN: 3x [conv3x3-BN-ReLU-maxpool] widths 32/64/128, linear head"),
    "cnn_small": (_cnn.cnn_small, "Plain CNN: 3x [conv3x3-BN-ReLU-maxpool] widths 16/32/64, linear head"),
    "mobilenetv2": (_mobilenetv2.mobilenetv2, "MobileNetV2 (Sandler et al. 2018), CIFAR variant with stride-1 stem"),
    "shufflenetv2": (_shufflenetv2.shufflenetv2,
                     "ShuffleNetV2 1.0x (Ma et al. 2018), CIFAR variant with stride-1 stem"),
}

MODELS: dict[str, Callable[[int], nn.Module]] = {name: ctor for name, (ctor, _) in _ZOO.items()}

ALIASES: dict[str, str] = {
    "wrn_16_1": "wrn16_1",
    "wrn_16_2": "wrn16_2",
    "wrn_40_1": "wrn40_1",
    "wrn_40_2": "wrn40_2",
    "wrn_28_10": "wrn28_10",
    "ResNet18": "resnet18",
    "ResNet34": "resnet34",
    "ResNet50": "resnet50",
    "MobileNetV2": "mobilenetv2",
    "ShuffleV2": "shufflenetv2",
}


def names() -> list[str]:
    """Sorted canonical model names (aliases excluded)."""
    return sorted(MODELS)


def _resolve(name: str) -> str:
    if isinstance(name, str):
        if name in MODELS:
            return name
        if name in ALIASES:
            return ALIASES[name]
    raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(names())}")


def build(name: str, num_classes: int) -> nn.Module:
    """Instantiate model ``name`` (canonical or alias) with ``num_classes`` logits."""
    canonical = _resolve(name)
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 2
    ):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MODELS[canonical](int(num_classes))


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not) in ``model``."""
    return sum(p.numel() for p in model.parameters())


def describe() -> list[tuple[str, int, str]]:
    """``(name, parameter count with 10 classes, description)`` for every model, sorted by name."""
    return [(name, count_parameters(build(name, 10)), _ZOO[name][1]) for name in names()]


def stages(model: nn.Module) -> list[str]:
    """Names of the submodules whose outputs are the model's stages, shallow to deep (the last one feeds the
    head): the places a forward hook taps an intermediate representation. Raises ValueError for a model whose
    stages are not known here."""
    if isinstance(model, _resnet_cifar.CifarResNet):
        return ["layer1", "layer2", "layer3"]
    if isinstance(model, _resnet.ResNet):
        return ["layer1", "layer2", "layer3", "layer4"]
    if isinstance(model, _wrn.WideResNet):
        return ["block1", "block2", "block3"]
    if isinstance(model, _shufflenetv2.ShuffleNetV2):
        return ["stage2", "stage3", "stage4"]
    if isinstance(model, _cnn.SimpleCNN):  # each conv-BN-ReLU-maxpool block ends at its pooling
        return [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    if isinstance(model, _mobilenetv2.MobileNetV2):  # a stage ends before each block that halves the resolution
        ends, i = [], -1
        for _, _, repeats, stride in _mobilenetv2.CFG:
            if stride == 2 and i >= 0:
                ends.append(i)
            i += repeats
        return [f"layers.{j}" for j in ends + [i]]
    raise ValueError(f"the stages of {type(model).__name__} are not known (models.stages)")
