"""Wide residual networks WRN-16-4 and WRN-22-4.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: depth d = 6n + 4, widening
factor k, three groups of n pre-activation basic blocks B(3,3) with 16k / 32k / 64k channels
(strides 1, 2, 2) after a 16-channel 3x3 stem, then BN-ReLU, global average pooling and a
linear classifier. Dropout between the two convs of a block, off (0) by default.
Used by EDM (Kariyappa et al., ICLR 2021): WRN-16-4 targets for CIFAR-10/100 (Table 1),
WRN-22-4 as the larger clone (App. A.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stealguard.errors import ConfigError
from stealguard.models.base import MODELS
from stealguard.models.layers import check_spec, init_weights


class WideBlock(nn.Module):
    """Pre-activation block: conv3x3(relu(BN(.))) twice, dropout in between, plus shortcut.

    When the shape changes the shortcut is a 1x1 strided conv applied to the activated input,
    as in the authors' code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.projection: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.projection = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))  # (B, C_in, H, W)
        residual = x if self.projection is None else self.projection(act)
        out = self.conv1(act)  # (B, planes, H/stride, W/stride)
        out = F.dropout(F.relu(self.bn2(out)), p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    """WRN-d-k. Features D = 64k; classifier Linear(D, K)."""

    def __init__(
        self, *, in_channels: int, num_classes: int, depth: int, widen: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n + 4 (16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBlock(in_planes, planes, stride, drop_rate))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.head = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))  # (B, 64k, H/4, W/4)
        return self.head(x)  # (B, 64k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


def _build(arch: str, depth: int, *, in_channels: int, image_size: int,
           num_classes: int) -> WideResNet:
    check_spec(arch, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    net = WideResNet(in_channels=in_channels, num_classes=num_classes, depth=depth, widen=4)
    init_weights(net)
    return net


@MODELS.register("wrn16_4")
def wrn16_4(*, in_channels: int, image_size: int, num_classes: int) -> WideResNet:
    """WRN-16-4 (~2.75 M parameters for 10 classes), dropout 0."""
    return _build("wrn16_4", 16, in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes)


@MODELS.register("wrn22_4")
def wrn22_4(*, in_channels: int, image_size: int, num_classes: int) -> WideResNet:
    """WRN-22-4 (~4.3 M parameters for 10 classes), dropout 0."""
    return _build("wrn22_4", 22, in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes)
