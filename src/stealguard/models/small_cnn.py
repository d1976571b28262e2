"""Small CNNs for the MNIST family: EDM's Conv3 and the LeNet-5 of the MAD paper.

- Conv3: Kariyappa, Prakash & Qureshi, "Protecting DNNs from Theft using an Ensemble of
  Diverse Models" (EDM), ICLR 2021, Table 1 (MNIST, FashionMNIST targets) and Sec. 5.1 (the
  hash function f_H is "a simple 3-layer convolutional neural network").
- LeNet: Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model
  Stealing Attacks" (MAD), ICLR 2020, Table 1 (MNIST, FashionMNIST victims); the network is
  LeNet-5 of LeCun et al., "Gradient-based learning applied to document recognition", 1998.
"""

from __future__ import annotations

import torch
from torch import nn

from stealguard.models.base import MODELS
from stealguard.models.layers import MaxPool2d, check_spec, init_weights


class Conv3(nn.Module):
    """EDM's 3-layer CNN. The paper gives no details, so the layers are our choice:

        3 x [conv 3x3 (pad 1) -> ReLU -> max-pool 2x2], channels 32 / 64 / 128,
        flatten -> Linear(128 * s * s, 128) -> ReLU -> classifier Linear(128, K),
    with s = image_size // 8 (3 for 28x28, 4 for 32x32). No BatchNorm, no dropout.
    On 32x32 inputs this is ~10 M multiply-adds, in line with EDM App. A.4 (Conv3 costs
    ~2.5% of a WRN-16-4). Features D = 128.
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                       MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 8  # three 2x2 pools, each floors
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 128),
                                    nn.ReLU(inplace=True))
        self.classifier = nn.Linear(128, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))  # (B, C, H, W) -> (B, 128, s, s) -> (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


class Conv3Maze(nn.Module):
    """The 3-layer CNN of the EDM authors' own code (Kariyappa et al., MAZE, CVPR 2021,
    github.com/sanjaykariyappa/MAZE, `src/models/conv3_mnist.py`; the EDM paper gives no
    layers, this is the same authors' conv3 for MNIST-like inputs):

        conv 3x3 (no pad) 32 -> ReLU -> max-pool 2x2 -> conv 3x3 64 -> ReLU
        -> conv 3x3 128 -> ReLU -> max-pool 2x2 -> flatten -> Linear(128 * s * s, 256)
        -> ReLU -> classifier Linear(256, K),

    with s = ((image_size - 2) // 2 - 4) // 2 (4 for 28x28). Features D = 256. PyTorch's
    default initialisation, as the authors' code (no `init_weights`).
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), MaxPool2d(2),
        )
        side = ((image_size - 2) // 2 - 4) // 2
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 256),
                                    nn.ReLU(inplace=True))
        self.classifier = nn.Linear(256, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))  # (B, C, H, W) -> (B, 128, s, s) -> (B, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling (the common modern variant):

        conv 5x5 (pad 2) 6 -> ReLU -> pool 2, conv 5x5 16 -> ReLU -> pool 2,
        flatten -> FC 120 -> ReLU -> FC 84 -> ReLU -> classifier Linear(84, K).
    The padding of 2 makes a 28x28 digit behave like LeNet's original 32x32 input
    (16 x 5 x 5 = 400 flattened features); a 32x32 input gives 16 x 6 x 6. Features D = 84.
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), MaxPool2d(2),
        )
        side = (image_size // 2 - 4) // 2  # conv1 keeps s, pool halves, conv2 takes 4
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))  # (B, C, H, W) -> (B, 16, s, s) -> (B, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


@MODELS.register("conv3")
def conv3(*, in_channels: int, image_size: int, num_classes: int) -> Conv3:
    """EDM's Conv3 (MNIST / FashionMNIST target and the hash network f_H)."""
    check_spec("conv3", in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, min_size=8)
    net = Conv3(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    init_weights(net)
    return net


@MODELS.register("conv3_maze")
def conv3_maze(*, in_channels: int, image_size: int, num_classes: int) -> Conv3Maze:
    """The EDM authors' conv3 from their MAZE code (MNIST-like inputs), default init."""
    check_spec("conv3_maze", in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, min_size=14)
    return Conv3Maze(in_channels=in_channels, image_size=image_size, num_classes=num_classes)


@MODELS.register("lenet")
def lenet(*, in_channels: int, image_size: int, num_classes: int) -> LeNet5:
    """MAD's LeNet (MNIST / FashionMNIST victim)."""
    check_spec("lenet", in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, min_size=12)
    net = LeNet5(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    init_weights(net)
    return net
