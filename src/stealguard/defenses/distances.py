"""Distances between the true posterior y and the returned ỹ, row-wise: (B, K), (B, K) -> (B,).

The utility constraint of MAD (Orekondy et al., ICLR 2020, eq. 7), dist(ỹ, y) <= ε, and the
perturbation metrics use these. KL is KL(y ‖ ỹ) = Σ_k y_k log(y_k / ỹ_k), the direction of the
authors' code (`F.kl_div(ỹ.log(), y)`); it is +inf where ỹ_k = 0 < y_k (top-k, rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stealguard.registry import Registry

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: Registry[Distance] = Registry("distance")


@DISTANCES.register("l1")
def l1(y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    return (y_tilde - y).abs().sum(1)


@DISTANCES.register("l2")
def l2(y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    return (y_tilde - y).norm(dim=1)


@DISTANCES.register("linf")
def linf(y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    return (y_tilde - y).abs().amax(1)


@DISTANCES.register("kl")
def kl(y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(y, y) - torch.xlogy(y, y_tilde)).sum(1)
