"""Random affine and colour transforms of a batch, for the adaptive averaging attack.

Kariyappa, Prakash, Qureshi. "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, appendix A.1: the perturbed inputs {x'_j}, j = 1..K, are drawn with "a combination of
random affine transforms (rotation, translation, scaling, shear) and random changes to
brightness, contrast, color and hue". The paper gives no ranges; ours are torchvision-like
defaults (below), all per image and batched (affine_grid + grid_sample; colour as tensor ops).

Affine, per image b (normalised coordinates in [-1, 1]):
    A_b = s_b * R(theta_b) @ [[1, tan(phi_b)], [0, 1]],  x' = A_b x + t_b
and grid_sample reads the input at A_b^{-1} (x' - t_b); outside pixels are 0.
Colour, per image: brightness x*b, contrast (x - mean)*c + mean, saturation (x - gray)*s + gray,
hue a rotation by 2*pi*h of the chroma plane (I, Q) of YIQ (a linear approximation of an HSV hue
shift); saturation and hue only act on 3-channel images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class AffineColorJitter(BaseModel):
    """Ranges of the random transforms (each drawn uniformly per image)."""

    model_config = ConfigDict(extra="forbid")

    degrees: float = Field(default=15.0, ge=0, le=180)      # rotation in [-degrees, degrees]
    translate: float = Field(default=0.1, ge=0, le=1)       # shift in [-t, t] x size, per axis
    scale_min: float = Field(default=0.9, gt=0)             # zoom in [scale_min, scale_max]
    scale_max: float = Field(default=1.1, gt=0)
    shear: float = Field(default=10.0, ge=0, lt=90)         # x-shear in [-shear, shear] degrees
    brightness: float = Field(default=0.3, ge=0, le=1)      # factor in [1 - b, 1 + b]
    contrast: float = Field(default=0.3, ge=0, le=1)
    saturation: float = Field(default=0.3, ge=0, le=1)      # the "colour" change
    hue: float = Field(default=0.05, ge=0, le=0.5)          # shift in [-h, h] of a full turn

    @model_validator(mode="after")
    def _ordered_scale(self) -> AffineColorJitter:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} > scale_max {self.scale_max}")
        return self


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) uniform draws in [low, high] on the generator's device (CPU)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_affine(x: torch.Tensor, jitter: AffineColorJitter, *, generator: torch.Generator
                  ) -> torch.Tensor:
    """Rotate, shear, scale and translate each image of (B, C, H, W) at random -> (B, C, H, W)."""
    b = x.shape[0]
    theta = _uniform(b, -jitter.degrees, jitter.degrees, generator) * math.pi / 180  # (B,)
    phi = _uniform(b, -jitter.shear, jitter.shear, generator) * math.pi / 180  # (B,)
    s = _uniform(b, jitter.scale_min, jitter.scale_max, generator)  # (B,)
    t = _uniform(2 * b, -jitter.translate, jitter.translate, generator).view(b, 2) * 2  # (B, 2)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    shear = torch.eye(2).repeat(b, 1, 1)  # (B, 2, 2)
    shear[:, 0, 1] = torch.tan(phi)
    forward = s[:, None, None] * rot @ shear  # (B, 2, 2): A_b
    inverse = torch.linalg.inv(forward)  # (B, 2, 2)
    offset = -(inverse @ t[:, :, None])  # (B, 2, 1): -A^{-1} t
    sample = torch.cat([inverse, offset], dim=2).to(x.device, x.dtype)  # (B, 2, 3)
    grid = F.affine_grid(sample, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, jitter: AffineColorJitter, *, generator: torch.Generator
                 ) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue per image of (B, C, H, W) in [0, 1]."""
    b, c = x.shape[:2]

    def factor(spread: float) -> torch.Tensor:  # (B, 1, 1, 1) on x's device
        return _uniform(b, 1 - spread, 1 + spread, generator).to(x.device).view(b, 1, 1, 1)

    x = (x * factor(jitter.brightness)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = ((x - mean) * factor(jitter.contrast) + mean).clamp(0, 1)
    if c != 3:
        return x
    gray = _gray(x)  # (B, 1, H, W)
    x = ((x - gray) * factor(jitter.saturation) + gray).clamp(0, 1)
    return _hue_shift(x, _uniform(b, -jitter.hue, jitter.hue, generator)).clamp(0, 1)


def random_affine_color(x: torch.Tensor, jitter: AffineColorJitter, *,
                        generator: torch.Generator) -> torch.Tensor:
    """EDM A.1's perturbation: a random affine transform, then a random colour change."""
    return color_jitter(random_affine(x, jitter, generator=generator), jitter, generator=generator)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma (BT.601) for RGB, the image itself for one channel."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _hue_shift(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB image's (I, Q) chroma by 2*pi*h_b. x: (B, 3, H, W), h: (B,)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ)  # (3, 3)
    angle = 2 * math.pi * h  # (B,)
    rot = torch.eye(3).repeat(h.shape[0], 1, 1)  # (B, 3, 3)
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(angle), torch.cos(angle)
    mix = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(x.device, x.dtype)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", mix, x)
