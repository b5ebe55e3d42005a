"""Wide Residual Networks (Zagoruyko & Komodakis, 2016) for CIFAR.

WRN-d-k: a 3x3 stem conv with 16 channels, three groups of ``n = (d - 4) / 6``
pre-activation blocks with widths 16k/32k/64k (strides 1/2/2), then BN-ReLU,
global average pooling and a linear classifier. When a block changes shape, its
shortcut is a bias-free 1x1 conv applied to the shared pre-activation, as in the
original code. Dropout defaults to 0.

Reference sizes (10 classes): WRN-16-2 0.70M, WRN-40-2 2.2M, WRN-28-10 36.5M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cifar import init_weights

__all__ = ["PreActBlock", "WideResNet", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "wrn28_10"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.equal_in_out = stride == 1 and in_ch == out_ch
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: when the shortcut is the identity, x itself is still needed.
        act = F.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(act)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must satisfy ``(depth - 4) % 6 == 0``."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        in_ch = 16
        groups: list[nn.Module] = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_ch, width, stride, dropout))
                in_ch = width
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def wrn16_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn16_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn40_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn40_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 2, num_classes)


def wrn28_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(28, 10, num_classes)
