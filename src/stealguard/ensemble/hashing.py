"""Input hashes that pick the EDM member answering a query, and their analysis (App. A.2).

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, section 4.2 and appendix A.2:

    index(x) = H(x) mod N                        (the paper's 1 + H(x) % N, 0-based here)
    DNN perceptual hash, f_H trained on a secret M-class task, m sub-classes per class:
    H(x) = m * argmax f_H(x) + floor( (M * max f_H(x) - 1) / (M - 1) * m )

f_H(x) are probabilities, so max f_H(x) lies in [1/M, 1] and the sub-class term in [0, m];
it reaches m only when max f_H(x) == 1 exactly, and we clamp it to m - 1 so that H takes the
paper's M * m values (our reading). Comparison hashes of appendix A.2:

    DCTHash   Zauner 2010 pHash: grayscale, 7x7 mean filter, 32x32, 2-D DCT-II, the 8x8
              lowest frequencies (rows/cols 1..8: the pHash reference code skips the DC
              term), bit = coefficient > median -> 64-bit hash
    SHA1Hash  SHA-1 of the image's uint8 pixel bytes (C, H, W order)

Every hash maps float images (B, C, H, W) in [0, 1] to member indices (B,) in [0, N).
`sorted_index_histogram` is the appendix A.2 analysis: for each image, the member indices
of many random perturbations, counted and sorted in decreasing order (a perfectly invariant
hash puts all mass in the first bin; a cryptographic hash spreads it evenly).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from stealguard.errors import ConfigError, InputError
from stealguard.models import Classifier
from stealguard.registry import Registry
from stealguard.training import to_float_images


class ImageHash(ABC):
    """(B, C, H, W) float images in [0, 1] -> hash values and member indices."""

    kind: str

    @abstractmethod
    def value(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) int64 hash values."""

    def index(self, x: torch.Tensor, *, members: int) -> torch.Tensor:
        """(B, C, H, W) -> (B,) int64 member indices H(x) mod N."""
        _check_members(members)
        return self.value(x) % members


def _check_members(members: int) -> None:
    if members < 2:
        raise ConfigError(f"an EDM ensemble needs N >= 2 members, got {members}")


HASHES: Registry[Callable[..., ImageHash]] = Registry("hash")


class DNNHash(nn.Module, ImageHash):
    """The paper's DNN perceptual hash over a network f_H trained on a secret task.

    Args:
        net: f_H, a classifier (pixels in [0, 1] -> logits (B, M)); kept in eval mode.
        num_classes: M; must equal the network's number of classes (default: taken from it).
        subclasses: m >= 1 sub-classes per class (paper: 2).
    """

    kind = "dnn"

    def __init__(self, net: Classifier, *, num_classes: int | None = None,
                 subclasses: int = 2) -> None:
        super().__init__()
        net_classes = int(net.num_classes)
        m_classes = net_classes if num_classes is None else int(num_classes)
        if m_classes != net_classes:
            raise ConfigError(f"hash parameter M = {m_classes} does not match the hash "
                              f"network, which has {net_classes} classes")
        if m_classes < 2:
            raise ConfigError(f"the hash network needs M >= 2 classes, got {m_classes}")
        if subclasses < 1:
            raise ConfigError(f"hash parameter m (sub-classes) must be >= 1, got {subclasses}")
        self.net = net.eval()
        self.num_classes, self.subclasses = m_classes, int(subclasses)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.net.input_shape)  # type: ignore[return-value]

    @torch.no_grad()
    def value(self, x: torch.Tensor) -> torch.Tensor:
        big_m, m = self.num_classes, self.subclasses
        p = torch.softmax(self.net.eval()(x).double(), dim=1)  # (B, M)
        p_max, cls = p.max(dim=1)  # (B,), (B,)
        sub = torch.floor((big_m * p_max - 1) / (big_m - 1) * m).long().clamp_(0, m - 1)
        return m * cls + sub  # (B,) in [0, M * m)

    def extra_repr(self) -> str:
        return "secret"


@HASHES.register("dnn")
def _dnn(*, net: Classifier, num_classes: int | None = None, subclasses: int = 2) -> DNNHash:
    return DNNHash(net, num_classes=num_classes, subclasses=subclasses)


def _dct_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ signal."""
    k = torch.arange(n, dtype=torch.float64, device=device).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64, device=device).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): ITU-R 601 luma for RGB, the channel mean otherwise."""
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def dct_bits(x: torch.Tensor) -> torch.Tensor:
    """Zauner's pHash bits: (B, C, H, W) in [0, 1] -> (B, 64) bool, row-major over 8x8."""
    g = _grayscale(x.double())  # (B, 1, H, W)
    g = nn.functional.avg_pool2d(g, 7, stride=1, padding=3, count_include_pad=False)
    g = nn.functional.interpolate(g, size=(32, 32), mode="bilinear", align_corners=False,
                                  antialias=g.shape[-1] > 32)[:, 0]  # (B, 32, 32)
    d = _dct_matrix(32, g.device)
    coef = d @ g @ d.T  # (B, 32, 32): 2-D DCT-II
    low = coef[:, 1:9, 1:9].reshape(-1, 64)  # (B, 64), DC term skipped as in pHash
    return low > low.median(dim=1, keepdim=True).values


@HASHES.register("dct")
class DCTHash(ImageHash):
    """Zauner (2010) DCT perceptual hash, 64 bits (value: the bits as a two's-complement int64)."""

    kind = "dct"

    def _bits(self, x: torch.Tensor) -> torch.Tensor:
        return dct_bits(x).long()  # (B, 64)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(63, -1, -1, device=x.device)  # bit 0 is the most significant
        return (self._bits(x) << shifts).sum(1)  # wraps to two's complement: (B,) int64

    def index(self, x: torch.Tensor, *, members: int) -> torch.Tensor:
        _check_members(members)
        # the unsigned 64-bit value mod N, exactly: sum_i bit_i * (2^(63-i) mod N)
        w = torch.tensor([pow(2, 63 - i, members) for i in range(64)], device=x.device)
        return (self._bits(x) * w).sum(1) % members


@HASHES.register("sha1")
class SHA1Hash(ImageHash):
    """SHA-1 of the uint8 pixels: a cryptographic hash, no perceptual invariance at all."""

    kind = "sha1"

    def _digests(self, x: torch.Tensor) -> list[bytes]:
        pixels = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [hashlib.sha1(img.tobytes()).digest() for img in pixels]

    def value(self, x: torch.Tensor) -> torch.Tensor:  # the first 8 digest bytes, signed
        vals = [int.from_bytes(d[:8], "big", signed=True) for d in self._digests(x)]
        return torch.tensor(vals, dtype=torch.int64, device=x.device)

    def index(self, x: torch.Tensor, *, members: int) -> torch.Tensor:
        _check_members(members)
        vals = [int.from_bytes(d, "big") % members for d in self._digests(x)]
        return torch.tensor(vals, dtype=torch.int64, device=x.device)


def random_perturbation(x: torch.Tensor, *, generator: torch.Generator,
                        strength: float = 1.0) -> torch.Tensor:
    """Random affine (rotation +-15 deg, translation +-10 %, scale 0.9..1.1, shear +-10 deg)
    plus brightness +-0.1 and contrast 0.8..1.2, each scaled by `strength`; per image.
    (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1]. Our stand-in for App. A.1's transforms."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:  # (B,) uniform in [lo, hi] around the identity
        return torch.rand(b, generator=generator, device=x.device) * (hi - lo) + lo

    s = strength
    rot, shear = u(-15 * s, 15 * s).deg2rad(), u(-10 * s, 10 * s).deg2rad()
    scale, tx, ty = 1 + u(-0.1 * s, 0.1 * s), u(-0.2 * s, 0.2 * s), u(-0.2 * s, 0.2 * s)
    rotation = torch.stack([torch.stack([rot.cos(), -rot.sin()], 1),
                            torch.stack([rot.sin(), rot.cos()], 1)], 1)  # (B, 2, 2)
    shearing = torch.eye(2, device=x.device).repeat(b, 1, 1)
    shearing[:, 0, 1] = shear.tan()
    linear = rotation @ shearing / scale.view(-1, 1, 1)  # (B, 2, 2)
    theta = torch.cat([linear, torch.stack([tx, ty], 1).unsqueeze(2)], 2)  # (B, 2, 3)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (B, C, H, W)
    contrast, bright = 1 + u(-0.2 * s, 0.2 * s), u(-0.1 * s, 0.1 * s)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.view(-1, 1, 1, 1) + mean + bright.view(-1, 1, 1, 1)
    return out.clamp(0, 1)


@torch.no_grad()
def sorted_index_histogram(
    hash_fn: ImageHash, images: torch.Tensor, *, members: int, perturbations: int = 1000,
    seed: int = 0, strength: float = 1.0, batch_size: int = 4096,
) -> torch.Tensor:
    """Appendix A.2: for each image, the fraction of its random perturbations hashed to each
    member, sorted in decreasing order. images (B, C, H, W) -> (B, N); rows sum to 1.
    Average over rows for the paper's Figure 6 curve (an invariant hash: [1, 0, ..., 0])."""
    _check_members(members)
    if images.dim() != 4:
        raise InputError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
    x = to_float_images(images)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    counts = torch.zeros(len(x), members, dtype=torch.float64, device=x.device)
    reps = max(1, batch_size // max(len(x), 1))  # perturbations per batch, for all images
    done = 0
    while done < perturbations:
        r = min(reps, perturbations - done)
        xb = x.repeat(r, 1, 1, 1)  # (r * B, C, H, W): image i at rows i, B + i, ...
        idx = hash_fn.index(random_perturbation(xb, generator=gen, strength=strength),
                            members=members).view(r, len(x))  # (r, B)
        counts += nn.functional.one_hot(idx, members).sum(0).double()  # (B, N)
        done += r
    return (counts / perturbations).sort(dim=1, descending=True).values.float()
