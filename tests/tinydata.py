"""A tiny data root in the torchvision layout (MNIST-family IDX files, a CIFAR-10 JPEG tree),
so CLI commands run with their defaults in seconds: `--data-root <this>`.

The MNIST-shaped images are learnable (class k lights a band k of the 28x28 image)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + array.tobytes(), mtime=0))


def _bands(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28))
    for k in range(10):
        x[labels == k, 2 + 2 * k: 4 + 2 * k, :] += 190
    return x.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


def make_tiny_root(root: Path, *, train: int = 300, test: int = 100) -> Path:
    """MNIST, FashionMNIST (train + test) and KMNIST (test only) with `train`/`test` images,
    and CIFAR-10 as a JPEG tree of `test` images per split."""
    for i, folder in enumerate(("MNIST", "FashionMNIST", "KMNIST")):
        for j, (split, n) in enumerate((("train", train), ("test", test))):
            if folder == "KMNIST" and split == "train":
                continue
            x, y = _bands(n, seed=10 * i + j)
            images, labels = MNIST_FILES[split]
            _idx(root / folder / "raw" / f"{images}.gz", x)
            _idx(root / folder / "raw" / f"{labels}.gz", y)
    from PIL import Image

    rng = np.random.default_rng(7)
    for split in ("train", "test"):
        for cls in ("airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck"):
            folder = root / "CIFAR10-jpg" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for m in range(max(1, test // 10)):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{m}.jpg")
    return root
