"""Batched augmentation and shape conversion on tensors, on whatever device the batch is on.

No per-sample Python loops: a random crop is one gather with per-sample offsets, a flip is one
`torch.where` on a per-sample mask. Random draws come from `generator` (on its own device, then
moved), so a seeded generator repeats the same augmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stealguard.errors import InputError

# ITU-R BT.601 luma weights, as Pillow's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise InputError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Draws happen on the generator's device (torch requires it), then move to the batch's."""
    return generator.device if generator is not None else device


def _rand(shape: tuple[int, ...], generator: torch.Generator | None,
          device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape` on `device`."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator, device)).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Integers in [0, high) of `shape` on `device`."""
    gen_device = _gen_device(generator, device)
    return torch.randint(0, high, shape, generator=generator, device=gen_device).to(device)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Zero-pad by `padding` on every side, then crop back to (H, W) at a random offset per sample.

    x: (B, C, H, W) -> (B, C, H, W). Sample b is shifted by (dy, dx) in [-padding, padding]^2,
    with zeros shifted in.
    """
    _check_batch(x)
    if padding < 0:
        raise InputError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x.clone()
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    offsets = _randint(2 * padding + 1, (2, b), generator, x.device)  # (2, B), (dy, dx) + p
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    ci = torch.arange(c, device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Mirror each sample left-right with probability p. x: (B, C, H, W) -> (B, C, H, W)."""
    _check_batch(x)
    mask = _rand((x.shape[0],), generator, x.device) < p  # (B,)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, *, crop_padding: int = 4, flip: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR training augmentation: random crop with zero padding, then h-flip."""
    out = random_crop(x, crop_padding, generator) if crop_padding else x
    return random_hflip(out, 0.5, generator) if flip else out


def to_shape(images: torch.Tensor, channels: int, size: int, *, chunk: int = 4096
             ) -> torch.Tensor:
    """Convert uint8 images (N, C, H, W) to (N, channels, size, size), still uint8.

    Grayscale -> RGB repeats the channel; RGB -> grayscale takes BT.601 luma; the spatial size
    changes by bilinear resizing (antialiased when shrinking). Lets e.g. CIFAR images be sent as
    queries to an MNIST-shaped model.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise InputError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] not in (1, 3) or channels not in (1, 3):
        raise InputError(f"only 1 or 3 channels are supported, got {images.shape[1]} -> {channels}")
    if size < 1:
        raise InputError(f"size must be >= 1, got {size}")
    parts = [_convert_chunk(images[i : i + chunk], channels, size)
             for i in range(0, images.shape[0], chunk)]
    if not parts:
        return images.new_empty((0, channels, size, size))
    return torch.cat(parts)


def _convert_chunk(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """One chunk of `to_shape`: float math, then round back to uint8."""
    out = x.float()  # (n, C, H, W)
    if out.shape[1] == 3 and channels == 1:
        luma = torch.tensor(_LUMA, device=out.device).view(1, 3, 1, 1)
        out = (out * luma).sum(dim=1, keepdim=True)  # (n, 1, H, W)
    elif out.shape[1] == 1 and channels == 3:
        out = out.expand(-1, 3, -1, -1)  # (n, 3, H, W)
    if out.shape[-2:] != (size, size):
        shrink = size < max(out.shape[-2:])
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=shrink)
    return out.round().clamp(0, 255).to(torch.uint8)
