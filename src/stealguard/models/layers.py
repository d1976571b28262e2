"""Pieces shared by the architecture modules: argument checks and weight initialisation."""

from __future__ import annotations

from torch import nn

from stealguard.errors import ConfigError


def check_spec(
    arch: str, *, in_channels: int, image_size: int, num_classes: int, min_size: int = 1,
) -> None:
    """Raise ConfigError unless the factory arguments describe a buildable network."""
    if in_channels < 1:
        raise ConfigError(f"{arch}: in_channels must be >= 1, got {in_channels}")
    if num_classes < 1:
        raise ConfigError(f"{arch}: num_classes must be >= 1, got {num_classes}")
    if image_size < min_size:
        raise ConfigError(
            f"{arch}: image_size must be >= {min_size} for this architecture, got {image_size}"
        )


def init_weights(net: nn.Module) -> None:
    """Standard init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default weights; every bias starts at 0.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
