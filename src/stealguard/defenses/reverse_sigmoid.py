"""Reverse sigmoid: soften the posterior and blur the non-top probabilities.

Lee, Edwards, Molloy & Srivastava, "Defending Against NN Model Stealing Attacks Using
Deceptive Perturbations", IEEE S&P Workshops 2019 (arXiv 1806.00054, 2018), eq. 3-4;
a baseline in Orekondy et al., "Prediction Poisoning", ICLR 2020, sec. 5.1 (i).

    r(y) = β (σ(γ σ^{-1}(y)) - 1/2),   σ^{-1}(y) = log(y / (1 - y))
    ỹ = α (y - r(y)),                  α normalises each row to sum 1

y is clamped to [1e-6, 1 - 1e-6] inside σ^{-1}. Like ART's implementation we clip y - r(y)
at 0 before normalising (the authors' code does not clip, and for large β returns negative
"probabilities"). The paper sweeps β in [0, 1] with γ fixed per dataset (MNIST 0.2,
FashionMNIST 0.4, CIFAR-10 0.1, others 0.2); the defaults are the authors' code's (1, 1).
"""

from __future__ import annotations

import torch
from pydantic import Field

from stealguard.defenses.base import DEFENSES, CheckedDefense, DefenseParams
from stealguard.errors import ConfigError


class ReverseSigmoidParams(DefenseParams):
    beta: float = Field(1.0, ge=0, allow_inf_nan=False, description="perturbation scale, beta >= 0")
    gamma: float = Field(1.0, ge=0, allow_inf_nan=False, description="sigmoid slope, gamma >= 0")


@DEFENSES.register("reverse_sigmoid")
class ReverseSigmoid(CheckedDefense):
    Params = ReverseSigmoidParams
    reads_input = False  # a function of probs alone

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0) -> None:
        for name, v in (("beta", beta), ("gamma", gamma)):
            if not v >= 0 or v == float("inf"):
                raise ConfigError(f"reverse_sigmoid: {name} must be a finite number >= 0, got {v}")
        self.beta, self.gamma = beta, gamma

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        y = probs.clamp(1e-6, 1 - 1e-6)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(y)) - 0.5)  # (B, K)
        out = (probs - r).clamp_min(0)
        total = out.sum(1, keepdim=True)  # (B, 1) > 0 whenever K >= 2
        return torch.where(total > 0, out / total.clamp_min(1e-30), probs)
