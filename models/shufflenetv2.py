"""ShuffleNetV2 (Ma et al., 2018), net size 1.0, adapted to CIFAR.

Stem: 3x3 stride-1 conv to 24 channels (no max-pool). Three stages with output
channels 116/232/464 and 3/7/3 units; each stage opens with a stride-2
down-sampling unit (both branches) followed by channel-split basic units. A 1x1
conv to 1024 channels, global average pooling and a linear classifier follow
(~1.26M params, 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet_cifar import init_weights

__all__ = ["ShuffleNetV2", "channel_shuffle", "shufflenetv2"]

# net_size -> (stage output channels..., final conv channels)
_CONFIGS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (224, 488, 976, 2048),
}
_UNITS = (3, 7, 3)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across ``groups`` (works for any memory format)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _pw(in_ch: int, out_ch: int) -> list[nn.Module]:
    """1x1 conv-BN-ReLU."""
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def _dw(ch: int, stride: int) -> list[nn.Module]:
    """3x3 depthwise conv-BN (no activation)."""
    return [
        nn.Conv2d(ch, ch, 3, stride=stride, padding=1, groups=ch, bias=False),
        nn.BatchNorm2d(ch),
    ]


class BasicUnit(nn.Module):
    """Split channels in half; transform one half (1x1, dw3x3, 1x1); concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        branch = channels - self.half
        self.branch = nn.Sequential(*_pw(branch, branch), *_dw(branch, 1), *_pw(branch, branch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x[:, : self.half], x[:, self.half :]
        return channel_shuffle(torch.cat([keep, self.branch(transform)], dim=1), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: both branches see the full input; output channels doubled-ish."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(*_dw(in_ch, 2), *_pw(in_ch, mid))
        self.right = nn.Sequential(*_pw(in_ch, mid), *_dw(mid, 2), *_pw(mid, out_ch - mid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, net_size: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        if net_size not in _CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(_CONFIGS)}, got {net_size}")
        *stage_ch, final_ch = _CONFIGS[net_size]
        self.stem = nn.Sequential(
            nn.Conv2d(3, 24, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
        )
        in_ch = 24
        stages: list[nn.Module] = []
        for out_ch, units in zip(stage_ch, _UNITS):
            units_ = [DownUnit(in_ch, out_ch), *(BasicUnit(out_ch) for _ in range(units))]
            stages.append(nn.Sequential(*units_))
            in_ch = out_ch
        self.stage2, self.stage3, self.stage4 = stages
        self.head = nn.Sequential(*_pw(in_ch, final_ch))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(final_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def shufflenetv2(num_classes: int = 10) -> ShuffleNetV2:
    return ShuffleNetV2(1.0, num_classes)
