"""The hash network f_H: "a simple 3-layer convolutional neural network" (EDM, sec. 5.1).

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, sections 4.2.1 and A.4: f_H is kept small so that hashing costs little next to
the member that answers (their Conv3 hash is ~2.5 % of a WRN-16-4). For MNIST-family
members, which are themselves `conv3`, a `conv3`-sized f_H would double the inference cost,
so the default f_H is `hash_cnn3`, our choice of layers:

    3 x [conv 3x3 (pad 1) -> ReLU -> max-pool 2x2], channels 8 / 16 / 32,
    flatten -> Linear(32 * s * s, 64) -> ReLU -> classifier Linear(64, M),   s = size // 8

about 7 % of `conv3`'s multiply-adds on 28x28 inputs. Registered in the model registry so a
bundle rebuilds it by name like any architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from stealguard.models.base import MODELS
from stealguard.models.layers import MaxPool2d, check_spec, init_weights


class HashCNN3(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 8), (8, 16), (16, 32)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                       MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 8  # three 2x2 pools, each floors
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 64),
                                    nn.ReLU(inplace=True))
        self.classifier = nn.Linear(64, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))  # (B, C, H, W) -> (B, 32, s, s) -> (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, M)


@MODELS.register("hash_cnn3")
def hash_cnn3(*, in_channels: int, image_size: int, num_classes: int) -> HashCNN3:
    """EDM's small hash network f_H (not a victim architecture)."""
    check_spec("hash_cnn3", in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, min_size=8)
    net = HashCNN3(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    init_weights(net)
    return net
