"""Plain convolutional students: no residual connections.

``cnn``: three conv3x3-BN-ReLU-maxpool2 blocks with widths 32/64/128, global
average pooling and a single linear layer (~0.09M params, 10 classes).
``cnn_small``: the same with widths 16/32/64 (~0.02M params).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .resnet_cifar import init_weights

__all__ = ["SimpleCNN", "cnn", "cnn_small"]


class SimpleCNN(nn.Module):
    """Stack of conv3x3-BN-ReLU-MaxPool2 blocks, then avg-pool and a linear head."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            layers += [
                nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def cnn(num_classes: int = 10) -> SimpleCNN:
    return SimpleCNN((32, 64, 128), num_classes)


def cnn_small(num_classes: int = 10) -> SimpleCNN:
    return SimpleCNN((16, 32, 64), num_classes)
