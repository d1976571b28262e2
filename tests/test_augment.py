"""Batched augmentation (crop, flip) and shape conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stealguard.data.augment import augment_batch, random_crop, random_hflip, to_shape
from stealguard.errors import InputError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pattern(b: int = 6, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    """Distinct, nonzero values everywhere, so a shifted copy is recognisable. (B, C, H, W)"""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)


def _shift(img: torch.Tensor, dy: int, dx: int, p: int) -> torch.Tensor:
    """Reference crop of one (C, H, W) image at offset (dy, dx) of its p-padded version."""
    h, w = img.shape[-2:]
    return F.pad(img, (p, p, p, p))[:, dy : dy + h, dx : dx + w]


@pytest.mark.parametrize("device", DEVICES)
def test_random_crop_is_a_shift(device: str) -> None:
    x, p = _pattern(b=200).to(device), 2
    out = random_crop(x, p, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.device == x.device
    seen = set()
    for b in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[b], _shift(x[b], dy, dx, p))]
        assert len(matches) == 1, f"sample {b} is not a shifted copy"
        seen.add(matches[0])
    assert len(seen) == (2 * p + 1) ** 2  # every offset occurs: offsets are per sample


def test_random_crop_zero_padding_is_identity() -> None:
    x = _pattern()
    assert torch.equal(random_crop(x, 0), x)
    with pytest.raises(InputError):
        random_crop(x, -1)
    with pytest.raises(InputError):
        random_crop(x[0], 1)


@pytest.mark.parametrize("device", DEVICES)
def test_random_hflip_flips_exactly_the_masked_samples(device: str) -> None:
    x = _pattern(b=64).to(device)
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(3))
    mask = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5  # the same draws
    mask = mask.to(device)
    assert 0 < int(mask.sum()) < 64
    assert torch.equal(out[mask], x[mask].flip(-1))
    assert torch.equal(out[~mask], x[~mask])
    assert torch.equal(random_hflip(x, 0.0), x)
    assert torch.equal(random_hflip(x, 1.0), x.flip(-1))


def test_augment_batch_seeded_repeatable() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = augment_batch(x, generator=torch.Generator().manual_seed(7))
    b = augment_batch(x, generator=torch.Generator().manual_seed(7))
    c = augment_batch(x, generator=torch.Generator().manual_seed(8))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, crop_padding=0, flip=False), x)


def test_to_shape_gray_to_rgb_and_resize() -> None:
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    rgb = to_shape(gray, 3, 28)
    assert rgb.dtype == torch.uint8 and rgb.shape == (5, 3, 28, 28)
    assert torch.equal(rgb, gray.expand(-1, 3, -1, -1))
    up = to_shape(gray, 3, 32)
    assert up.shape == (5, 3, 32, 32) and up.dtype == torch.uint8


def test_to_shape_rgb_to_gray_luma_and_constant_resize() -> None:
    color = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 32, 32)
    gray = to_shape(color.contiguous(), 1, 28, chunk=3)
    assert gray.shape == (4, 1, 28, 28)
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # 124
    assert torch.all(gray == expected)  # a flat image stays flat through the resize


def test_to_shape_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        to_shape(torch.zeros(2, 3, 8, 8), 1, 8)  # float, not uint8
    with pytest.raises(InputError):
        to_shape(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), 3, 8)
    assert to_shape(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), 3, 4).shape == (0, 3, 4, 4)
