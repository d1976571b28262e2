"""Top-k: return only the k most probable classes, renormalised.

Orekondy, Schiele & Fritz, "Knockoff Nets: Stealing Functionality of Black-Box Models",
CVPR 2019 (a truncation defense); evaluated as a baseline in Orekondy et al., "Prediction
Poisoning", ICLR 2020, sec. 5.1 ("returning top-k labels"; k = 1 is the 'argmax' defense).

    ỹ_j = y_j 1[j ∈ top_k(y)] / Σ_{i ∈ top_k(y)} y_i

k = 1 returns the one-hot argmax. Ties are broken toward the lower class index, as `argmax`
does, so the top class never changes.

    TopK(k=3)(x, probs)   # (B, K) -> (B, K), at most 3 non-zeros per row
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stealguard.defenses.base import DEFENSES, CheckedDefense, Defense, DefenseParams
from stealguard.errors import ConfigError


class TopKParams(DefenseParams):
    k: int = Field(1, ge=1, description="classes kept, an integer 1 <= k <= K")


def check_k(k: int, num_classes: int) -> None:
    if not 1 <= k <= num_classes:
        raise ConfigError(f"topk: k must be an integer in [1, K={num_classes}], got {k}")


@DEFENSES.register("topk")
class TopK(CheckedDefense):
    Params = TopKParams
    reads_input = False  # a function of probs alone
    preserves_argmax = True

    def __init__(self, *, k: int = 1) -> None:
        if k < 1:
            raise ConfigError(f"topk: k must be an integer in [1, K], got {k}")
        self.k = k

    @classmethod
    def from_params(cls, params: TopKParams, *, victim: torch.nn.Module | None = None,  # type: ignore[override]
                    key: bytes | None = None, **components: Any) -> Defense:
        if victim is not None:
            check_k(params.k, int(victim.num_classes))  # type: ignore[arg-type]
        return cls(k=params.k)

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        check_k(self.k, probs.shape[1])
        order = probs.sort(dim=1, descending=True, stable=True).indices[:, :self.k]  # (B, k)
        kept = torch.zeros_like(probs).scatter_(1, order, probs.gather(1, order))  # (B, K)
        return kept / kept.sum(1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
