"""A seeded 4-class, 8x8 problem: class k lights up quadrant k (plus noise). Learnable in
a few hundred steps on a CPU, so the training, attack and CLI tests run in seconds."""

from __future__ import annotations

import torch

from stealguard.data import ImageDataset


def quadrant_images(n: int, *, seed: int = 0, channels: int = 1, size: int = 8
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, channels, size, size, generator=g) * 0.3  # (n, C, S, S)
    half = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        m = labels == k
        x[m, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.7
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def quadrant_dataset(n: int, *, seed: int = 0, split: str = "train") -> ImageDataset:
    images, labels = quadrant_images(n, seed=seed)
    return ImageDataset("quadrants", split, images, labels, ["tl", "tr", "bl", "br"],
                        (0.5,), (0.5,))


def quadrant_victim():  # -> Classifier
    """The tests' standard victim: conv3 trained 4 epochs on 512 quadrant images (about
    99 % on fresh ones)."""
    from stealguard.models import build_model
    from stealguard.training import TrainConfig, train

    x, y = quadrant_images(512, seed=1)
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    train(model, x, y, config=TrainConfig(epochs=4, batch_size=32, lr=0.05), progress=False)
    return model
