"""Random noise on the logits, projected to an ε ball, renormalised.

Orekondy, Schiele & Fritz, "Prediction Poisoning", ICLR 2020, sec. 5.1 (ii) ("rand-noise"):

    z = σ^{-1}(y) = log(y / (1 - y)),   z̃ = z + δ,   ||δ||_p <= ε_z  (projection, Duchi et al. 2008)
    ỹ = σ(z̃) / Σ_k σ(z̃_k)

As in the authors' code (`bb_randnoise.py`), δ is drawn uniformly from [0, 2 ε / K^{1/p}]^K (so
that ||E δ||_p = ε) and then projected onto the L1 or L2 ball of radius ε. The budget holds in
logit space (`noise(x, K)` returns δ); the output-space distance is not bounded by ε.

z is the authors' unclamped σ^{-1}(y), in float64: a probability of exactly 0 (or 1) gives
z = -inf (+inf) and σ(z + δ) = 0 (1), which is the formula's limit, so no clamp is needed
(a clamp at 1e-6 moved small probabilities up to ~1e-6 · e^δ).

δ is a keyed hash of the image bytes (`keyed.py`): the same image gets the same noise
every time, so repeating a query gains the attacker nothing.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stealguard.defenses.base import DEFENSES, Budget, CheckedDefense, Defense, DefenseParams
from stealguard.defenses.keyed import keyed_uniform, new_key
from stealguard.errors import ConfigError


class RandomNoiseParams(DefenseParams):
    epsilon: float = Field(ge=0, allow_inf_nan=False,
                           description="radius of the logit-noise ball, epsilon >= 0")
    dist: Literal["l1", "l2"] = Field("l2", description="norm of the ball, l1 or l2")


def project_l1_ball(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each row of v (B, K) onto {||δ||_1 <= eps} (Duchi et al. 2008)."""
    a = v.abs()
    u = a.sort(dim=1, descending=True).values  # (B, K)
    css = u.cumsum(1) - eps  # (B, K)
    j = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)  # (K,)
    rho = (u - css / j > 0).sum(1, keepdim=True).clamp_min(1)  # (B, 1) support size
    theta = (css.gather(1, rho - 1) / rho).clamp_min(0)  # (B, 1)
    projected = v.sign() * (a - theta).clamp_min(0)
    return torch.where(a.sum(1, keepdim=True) <= eps, v, projected)


def project_l2_ball(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v * (eps / v.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)


PROJECTIONS = {"l1": project_l1_ball, "l2": project_l2_ball}


@DEFENSES.register("random_noise")
class RandomNoise(CheckedDefense):
    Params = RandomNoiseParams

    def __init__(self, *, epsilon: float, dist: str = "l2", key: bytes | None = None) -> None:
        if not 0 <= epsilon < float("inf"):
            raise ConfigError(f"random_noise: epsilon must be a finite number >= 0, got {epsilon}")
        if dist not in PROJECTIONS:
            raise ConfigError(f"random_noise: dist must be one of l1, l2, got {dist!r}")
        self.epsilon, self.dist = epsilon, dist
        self.logit_budget = Budget(dist, epsilon)  # on δ, not on ỹ - y
        self._key = key if key is not None else new_key()

    @classmethod
    def from_params(cls, params: RandomNoiseParams, *, victim: torch.nn.Module | None = None,  # type: ignore[override]
                    key: bytes | None = None, **components: Any) -> Defense:
        return cls(epsilon=params.epsilon, dist=params.dist, key=key)

    def __repr__(self) -> str:
        return f"RandomNoise(epsilon={self.epsilon}, dist={self.dist!r})"  # never the key

    def noise(self, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The logit noise δ (B, K) for images x, inside the ε ball."""
        p = 1.0 if self.dist == "l1" else 2.0
        high = 2 * self.epsilon / num_classes ** (1 / p)
        delta = keyed_uniform(x, self._key, num_classes) * high  # (B, K) float64
        return PROJECTIONS[self.dist](delta, self.epsilon)

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        z = torch.logit(probs.double())  # (B, K) per-class logits, +-inf at exact 0 / 1
        s = torch.sigmoid(z + self.noise(x, probs.shape[1]))  # (B, K)
        return (s / s.sum(1, keepdim=True)).to(probs.dtype)
