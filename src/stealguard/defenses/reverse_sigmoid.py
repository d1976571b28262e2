"""Reverse sigmoid: soften the posterior and blur the non-top probabilities.

Lee, Edwards, Molloy & Srivastava, "Defending Against NN Model Stealing Attacks Using
Deceptive Perturbations", IEEE S&P Workshops 2019 (arXiv 1806.00054, 2018), eq. 3-4;
a baseline in Orekondy et al., "Prediction Poisoning", ICLR 2020, sec. 5.1 (i).

    r(y) = β (σ(γ σ^{-1}(y)) - 1/2),   σ^{-1}(y) = log(y / (1 - y))
    ỹ = α (y - r(y)),                  α normalises each row to sum 1

As IBM ART's `ReverseSigmoid` (1.20), y is clamped to [1e-9, 1 - 1e-9] inside σ^{-1}, y - r(y)
is clipped to [0, 1] before normalising (the authors' code does not clip, and for large β
returns negative "probabilities"), and the arithmetic is float64: the answers equal ART's to
~1e-15 (tests/fixtures/art_reverse_sigmoid.json holds numbers computed by ART). A wider clamp
(1e-6) moved answers by up to 0.05 per entry on a real MNIST victim. The paper sweeps β in [0, 1] with γ fixed per dataset (MNIST 0.2,
FashionMNIST 0.4, CIFAR-10 0.1, others 0.2); the defaults are the authors' code's (1, 1).
"""

from __future__ import annotations

import torch
from pydantic import Field

from stealguard.defenses.base import DEFENSES, CheckedDefense, DefenseParams
from stealguard.errors import ConfigError

CLIP = 1e-9  # ART's clip of y inside the inverse sigmoid


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
        y = probs.double()  # (B, K)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(y.clamp(CLIP, 1 - CLIP))) - 0.5)
        out = (y - r).clamp(0.0, 1.0)
        total = out.sum(1, keepdim=True)  # (B, 1) > 0 whenever K >= 2
        return torch.where(total > 0, out / total.clamp_min(1e-300), y).to(probs.dtype)
