"""CIFAR-style residual networks: ResNet-20/32 and ResNet-18/34.

- He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2:
  the CIFAR-10 networks with 6n+2 layers, 3 stages of 16 / 32 / 64 channels and 3x3 basic
  blocks; n = 3 gives ResNet-20 (0.27 M parameters), n = 5 ResNet-32 (0.46 M). The paper uses
  shortcut option A there (identity, subsampled, with zero-padded extra channels: no
  parameters), and so do we.
- ResNet-18/34 are the ImageNet networks of the same paper (Table 1: basic blocks, 4 stages
  of 64..512 channels, [2,2,2,2] and [3,4,6,3] blocks) in the usual CIFAR adaptation: a 3x3
  stride-1 stem conv and no initial max-pool. Their projection shortcuts are option B
  (1x1 conv + BN when the shape changes).
Used by EDM (ICLR 2021): ResNet-18 target for Flowers-17, ResNet-20 / ResNet-32 as larger
clone models (App. A.5); by MAD (ICLR 2020): ResNet-34 attacker / surrogate (App. E).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stealguard.models.base import MODELS
from stealguard.models.layers import check_spec, init_weights


class ShortcutA(nn.Module):
    """Option A: take every `stride`-th pixel and zero-pad the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, ceil(H/s), ceil(W/s))
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))  # (B, C_out, H', W')


def shortcut_b(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option B: a 1x1 strided projection followed by BN."""
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)), post-activation as in He et al."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = (ShortcutA(in_planes, planes, stride) if shortcut == "A"
                             else shortcut_b(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 -> stages of BasicBlocks (first stride 1, then 2) -> global avg pool.

    Features D = widths[-1]; classifier Linear(D, K).
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, widths: Sequence[int],
        blocks: Sequence[int], shortcut: str,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stage = []
            for s in strides:
                stage.append(BasicBlock(in_planes, planes, s, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, widths[-1], H / 2^(S-1), W / 2^(S-1))
        return self.pool(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


def _build(arch: str, *, in_channels: int, image_size: int, num_classes: int,
           widths: Sequence[int], blocks: Sequence[int], shortcut: str) -> ResNet:
    check_spec(arch, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    net = ResNet(in_channels=in_channels, num_classes=num_classes, widths=widths,
                 blocks=blocks, shortcut=shortcut)
    init_weights(net)
    return net


@MODELS.register("resnet20")
def resnet20(*, in_channels: int, image_size: int, num_classes: int) -> ResNet:
    """He et al. CIFAR ResNet-20 (n = 3), option-A shortcuts."""
    return _build("resnet20", in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes, widths=(16, 32, 64), blocks=(3, 3, 3), shortcut="A")


@MODELS.register("resnet32")
def resnet32(*, in_channels: int, image_size: int, num_classes: int) -> ResNet:
    """He et al. CIFAR ResNet-32 (n = 5), option-A shortcuts."""
    return _build("resnet32", in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes, widths=(16, 32, 64), blocks=(5, 5, 5), shortcut="A")


@MODELS.register("resnet18")
def resnet18(*, in_channels: int, image_size: int, num_classes: int) -> ResNet:
    """ResNet-18, CIFAR stem (3x3 conv, no max-pool), option-B shortcuts."""
    return _build("resnet18", in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                  shortcut="B")


@MODELS.register("resnet34")
def resnet34(*, in_channels: int, image_size: int, num_classes: int) -> ResNet:
    """ResNet-34, CIFAR stem (3x3 conv, no max-pool), option-B shortcuts."""
    return _build("resnet34", in_channels=in_channels, image_size=image_size,
                  num_classes=num_classes, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                  shortcut="B")
