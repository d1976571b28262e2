"""The in-memory dataset type every loader returns, and the dataset registry.

Images are kept as uint8 (N, C, H, W) tensors (0..255); models take float images in [0, 1]
and normalise inside (see `stealguard.models.Normalize`), so the black box, defenses and
attacks all work in one pixel space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stealguard.errors import InputError
from stealguard.registry import Registry


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    images: uint8 (N, C, H, W); labels: int64 (N,), values in [0, num_classes).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise InputError(
                f"{self.name}/{self.split}: images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise InputError(
                f"{self.name}/{self.split}: {self.images.shape[0]} images but labels of "
                f"shape {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, n: int | None = None, *, seed: int = 0) -> ImageDataset:
        """A seeded random subset of n rows (all rows, shuffled, if n is None)."""
        if n is not None and n < 1:
            raise InputError(f"a subset needs n >= 1 images, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)
        if n is not None:
            idx = idx[:n]
        return ImageDataset(
            self.name, self.split, self.images[idx], self.labels[idx], self.classes,
            self.mean, self.std,
        )

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1], (N, C, H, W)."""
        return self.images.float().div_(255.0)


# A loader takes the data root and a split ("train" or "test") and returns the dataset.
Loader = Callable[[Path, str], ImageDataset]
DATASETS: Registry[Loader] = Registry("dataset")
