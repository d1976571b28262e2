"""Generators of the data-free attacks (DFME, MAZE): noise z -> images, registered by name.

Both papers use the generator of DFAD (Fang et al., "Data-Free Adversarial Distillation",
2019), itself DCGAN-like:

    z (B, nz) -> Linear -> (B, 2*ngf, s/4, s/4) -> BN
      -> upsample x2 -> conv 3x3 2*ngf -> BN -> LeakyReLU(0.2)
      -> upsample x2 -> conv 3x3 ngf   -> BN -> LeakyReLU(0.2)
      -> conv 3x3 C -> BN  = x_pre (B, C, s, s),   x = tanh(x_pre) in [-1, 1]

- "dfme": Truong et al. (CVPR 2021), the authors' `GeneratorA`: nz = 256, ngf = 64, the last
  BN without affine parameters.
- "maze": Kariyappa et al. (CVPR 2021), the authors' `conv3_gen`: nz = 100, 128 / 64
  channels (ngf = 64), the last BN affine.

The image side s must be a multiple of 4 (28 for MNIST: 7 -> 14 -> 28; 32 for CIFAR:
8 -> 16 -> 32). The attacks perturb `x_pre` for their finite differences, so every
perturbed point stays a valid image after tanh; `to_pixels` maps [-1, 1] to the black box's
[0, 1]. `ngf` is a parameter because the papers' 64 costs ~90 M multiply-adds per 28x28
image, about 12x our conv3 victim: on a CPU a narrower generator (ngf = 16-32) is the
affordable choice, and the spec says which one it used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stealguard.errors import ConfigError
from stealguard.registry import Registry

GeneratorFactory = Callable[..., "Generator"]
GENERATORS: Registry[GeneratorFactory] = Registry("generator")


class GeneratorConfig(BaseModel):
    """Which registered generator, and its sizes (None: the paper's). Unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "dfme"
    nz: int | None = Field(default=None, ge=1, description="noise dimension")
    ngf: int | None = Field(default=None, ge=1, description="base width (paper: 64)")


class Generator(nn.Module):
    """z (B, nz) -> x_pre (B, C, s, s), the pre-tanh image; `forward` returns x_pre."""

    def __init__(self, *, nz: int, ngf: int, channels: int, image_size: int,
                 final_affine: bool) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ConfigError(f"generator: image_size must be a multiple of 4, got {image_size}")
        self.nz, self.channels, self.image_size = nz, channels, image_size
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1),
            nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2, inplace=True))
        self.block2 = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * ngf, ngf, 3, padding=1),
            nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1), nn.BatchNorm2d(channels, affine=final_affine))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)  # (B, 2ngf, s/4, s/4)
        return self.block2(self.block1(self.bn0(h)))  # (B, C, s, s) pre-tanh

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """n noise vectors z ~ N(0, I), (n, nz)."""
        return torch.randn(n, self.nz, generator=generator).to(device)


def to_pixels(x_pre: torch.Tensor) -> torch.Tensor:
    """Pre-tanh generator output -> images in [0, 1]: (tanh(x_pre) + 1) / 2."""
    return (torch.tanh(x_pre) + 1.0) / 2.0


def _build(arch: str, *, nz: int, ngf: int, channels: int, image_size: int,
           final_affine: bool) -> Generator:
    if channels < 1:
        raise ConfigError(f"{arch} generator: channels must be >= 1, got {channels}")
    return Generator(nz=nz, ngf=ngf, channels=channels, image_size=image_size,
                     final_affine=final_affine)


@GENERATORS.register("dfme")
def dfme_generator(*, channels: int, image_size: int, nz: int | None = None,
                   ngf: int | None = None) -> Generator:
    """DFME's GeneratorA (nz 256, ngf 64, last BN without affine)."""
    return _build("dfme", nz=nz or 256, ngf=ngf or 64, channels=channels,
                  image_size=image_size, final_affine=False)


@GENERATORS.register("maze")
def maze_generator(*, channels: int, image_size: int, nz: int | None = None,
                   ngf: int | None = None) -> Generator:
    """MAZE's conv3_gen (nz 100, 128 / 64 channels, last BN affine)."""
    return _build("maze", nz=nz or 100, ngf=ngf or 64, channels=channels,
                  image_size=image_size, final_affine=True)


def build_generator(config: GeneratorConfig, *, channels: int, image_size: int) -> Generator:
    """The registered generator `config.arch` for images (channels, image_size, image_size)."""
    factory = GENERATORS.get(config.arch)
    return factory(channels=channels, image_size=image_size, nz=config.nz, ngf=config.ngf)
