"""Registers every model architecture of the two papers (importing a module registers it).

EDM (Kariyappa et al., ICLR 2021): conv3, wrn16_4, wrn22_4, resnet18, resnet20, resnet32.
MAD (Orekondy et al., ICLR 2020): lenet, vgg16_bn, resnet34.

Each factory: f(*, in_channels, image_size, num_classes) -> Net with forward_features (B, D),
classifier nn.Linear(D, K) and forward = classifier(forward_features(x)) (see base.py).
"""

from stealguard.models.resnet import resnet18, resnet20, resnet32, resnet34
from stealguard.models.small_cnn import conv3, lenet
from stealguard.models.vgg import vgg16_bn
from stealguard.models.wide_resnet import wrn16_4, wrn22_4

__all__ = [
    "conv3", "lenet", "resnet18", "resnet20", "resnet32", "resnet34", "vgg16_bn",
    "wrn16_4", "wrn22_4",
]
