"""Rounding: return the probabilities rounded to a few decimals.

Tramèr, Zhang, Juels, Reiter & Ristenpart, "Stealing Machine Learning Models via Prediction
APIs", USENIX Security 2016, sec. 7 ("rounding confidences"); a baseline in Orekondy et al.,
"Prediction Poisoning", ICLR 2020, sec. 5.1.

Plain rounding does not keep rows on the simplex (0.333 x 3 = 0.999), so we round with the
largest-remainder method: with u = 10^decimals,
    ỹ = (⌊u y⌋ + 1[j among the (u - Σ⌊u y⌋) largest remainders]) / u,
which is the closest row of multiples of 1/u that sums to exactly 1 (every |ỹ_j - y_j| < 1/u).
decimals = 0 returns the one-hot argmax. Ties may move the top class, so no argmax claim.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stealguard.defenses.base import DEFENSES, Budget, CheckedDefense, DefenseParams
from stealguard.errors import ConfigError


class RoundingParams(DefenseParams):
    decimals: int = Field(2, ge=0, le=6, description="decimal places, an integer 0 <= decimals <= 6")


@DEFENSES.register("rounding")
class Rounding(CheckedDefense):
    Params = RoundingParams
    reads_input = False  # a function of probs alone

    def __init__(self, *, decimals: int = 2) -> None:
        if not 0 <= decimals <= 6:
            raise ConfigError(f"rounding: decimals must be an integer in [0, 6], got {decimals}")
        self.decimals = decimals
        self.budget = Budget("linf", 10.0 ** -decimals)

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        units = 10 ** self.decimals
        p = probs.double().clamp_min(0)
        scaled = p / p.sum(1, keepdim=True) * units  # (B, K), rows sum to `units`
        floor = scaled.floor()
        missing = (units - floor.sum(1)).round().long()  # (B,) in [0, K)
        rank = (scaled - floor).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        rounded = floor + (rank < missing[:, None]).double()  # (B, K) integers summing to `units`
        return (rounded / units).to(probs.dtype)
