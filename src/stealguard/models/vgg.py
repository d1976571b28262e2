"""VGG-16 with batch normalisation, CIFAR style.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, configuration D (13 conv layers), with BN after every conv (Ioffe & Szegedy 2015).
Used by MAD (Orekondy et al., ICLR 2020, Table 1) as the CIFAR-10/100 victim. The paper's
VGG16 is the ImageNet one (100 M+ parameters, pretrained); ours is the common CIFAR
adaptation: the three 4096-wide FC layers are replaced by global average pooling and one
Linear classifier (~14.7 M parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stealguard.models.base import MODELS
from stealguard.models.layers import MaxPool2d, check_spec, init_weights

# Configuration D: numbers are conv3x3 output channels, "M" a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def make_layers(cfg: Sequence[int | str], *, in_channels: int, image_size: int) -> nn.Sequential:
    """conv3x3-BN-ReLU per number; a max-pool per "M" only while the side is still >= 2,
    so 28x28 inputs (28 -> 14 -> 7 -> 3 -> 1) skip the last pool instead of failing."""
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for v in cfg:
        if v == "M":
            if side >= 2:
                layers.append(MaxPool2d(2))
                side //= 2
            continue
        assert isinstance(v, int)
        layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                   nn.ReLU(inplace=True)]
        channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Conv stack -> global average pool -> classifier. Features D = last conv width (512)."""

    def __init__(self, cfg: Sequence[int | str], *, in_channels: int, image_size: int,
                 num_classes: int) -> None:
        super().__init__()
        self.features = make_layers(cfg, in_channels=in_channels, image_size=image_size)
        width = [v for v in cfg if isinstance(v, int)][-1]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))  # (B, 512, h, w) -> (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


@MODELS.register("vgg16_bn")
def vgg16_bn(*, in_channels: int, image_size: int, num_classes: int) -> VGG:
    """CIFAR-style VGG-16-BN (convs without bias, since BN follows each)."""
    check_spec("vgg16_bn", in_channels=in_channels, image_size=image_size,
               num_classes=num_classes)
    net = VGG(VGG16_CFG, in_channels=in_channels, image_size=image_size,
              num_classes=num_classes)
    init_weights(net)
    return net
