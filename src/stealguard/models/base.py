"""Model registry and the wrapper that puts normalisation inside the model.

Every registered factory has the signature
    factory(*, in_channels: int, image_size: int, num_classes: int) -> Net
where a Net is an nn.Module with
    forward_features(x) -> (B, D) penultimate features, and
    classifier: nn.Linear (D -> num_classes), and
    forward(x) = classifier(forward_features(x)) -> logits (B, K).
The split lets MAD use the last linear layer in closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stealguard.registry import Registry

Factory = Callable[..., nn.Module]
MODELS: Registry[Factory] = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers so they travel with the weights."""

    mean: torch.Tensor  # (1, C, 1, 1) buffers
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Pixel images in [0, 1] (B, C, H, W) -> logits (B, K). Normalisation is inside."""

    def __init__(
        self, net: nn.Module, *, arch: str, in_channels: int, image_size: int,
        num_classes: int, mean: Sequence[float], std: Sequence[float],
    ) -> None:
        super().__init__()
        self.arch, self.in_channels, self.image_size, self.num_classes = (
            arch, in_channels, image_size, num_classes,
        )
        self.normalize = Normalize(mean, std)
        self.net = net

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))  # type: ignore[operator]

    @property
    def classifier(self) -> nn.Linear:
        return self.net.classifier  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) float32 probabilities (a `stealguard.victim.Predictor`)."""
        return torch.softmax(self(x).float(), dim=1)


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Register a model factory under `name` (a decorator), so the CLI, specs, clones and EDM
    members can be built from your own architecture by name:

        @stealguard.register_model("mynet")
        def mynet(*, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
            return MyNet(in_channels, image_size, num_classes)

    The factory returns a module mapping normalised images (B, C, H, W) to logits (B, K);
    `build_model` puts the input normalisation in front. For MAD's last-layer form it should
    also have forward_features(x) (B, D) and `classifier` (nn.Linear D -> K). A name already
    registered is refused.
    """
    return MODELS.register(name)


def build_model(
    arch: str, *, in_channels: int, image_size: int, num_classes: int,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> Classifier:
    """Build a registered architecture wrapped with its input normalisation."""
    factory = MODELS.get(arch)
    net = factory(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.5,) * in_channels
    return Classifier(
        net, arch=arch, in_channels=in_channels, image_size=image_size,
        num_classes=num_classes, mean=mean, std=std,
    )


INPUT_SHAPES = {"1x28x28": (1, 28), "3x32x32": (3, 32)}  # MNIST-like, CIFAR-like


def describe_models(num_classes: int = 10) -> list[dict[str, Any]]:
    """Each registered architecture with its parameter count per input shape (None where the
    architecture does not take that shape)."""
    rows: list[dict[str, Any]] = []
    for name in MODELS.names():
        params: dict[str, int | None] = {}
        for label, (c, size) in INPUT_SHAPES.items():
            try:
                with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                    model = build_model(name, in_channels=c, image_size=size,
                                        num_classes=num_classes)
                params[label] = sum(p.numel() for p in model.parameters())
            except (ValueError, RuntimeError):
                params[label] = None
        rows.append({"name": name, "params": params})
    return rows
