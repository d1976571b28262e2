"""DFME: Data-Free Model Extraction.

Truong, Maini, Walls, Papernot. "Data-Free Model Extraction", CVPR 2021. No attacker data:
a generator G synthesises the queries, the clone S (the paper's "student") learns the victim
V on them, and G learns to find where S and V disagree (the loop is in datafree.py):

    S:  min_{theta_S}  L(x),    G:  max_{theta_G}  L(x),    x = G(z), z ~ N(0, I)     (Eq. 1)
    L(x) = || l_V(x) - l_S(x) ||_1  (mean over the K classes)                          (Eq. 3)

The black box answers probabilities, not logits; DFME recovers logits up to a constant
(section 3.3, Eq. 6, with the authors' "mean" correction):

    l_V,i(x) ~= log p_V,i(x) - (1/K) sum_k log p_V,k(x)

(a zero probability, e.g. from a top-k or one-hot answer, is floored at `prob_floor` first).
G's gradient is the forward-difference estimate (Eq. 4-5) along m random unit directions
u_j of the d pre-tanh pixels, epsilon = 1e-3, m = 1 in the paper's runs:

    grad_x L(x) ~= (d / m) sum_j [L(x + eps u_j) - L(x)] / eps * u_j

Settings of the authors' code (cake-lab/datafree-model-extraction): B = 256, n_G = 1,
n_S = 5, so a round costs B * (n_G (m + 1) + n_S) = 1792 queries; S: SGD lr 0.1, momentum
0.9, weight decay 5e-4; G: Adam lr 1e-4; both lrs x0.3 at 10 %, 30 % and 50 % of the rounds;
generator GeneratorA (nz 256). The paper's clone is a ResNet-18-8x for CIFAR-10 / SVHN; ours
is the `arch` parameter (`steal` defaults it to the victim's, as for our other attacks).

    attack = build_attack("dfme", None, {"arch": "conv3", "generator": {"ngf": 16}})
    result = attack(blackbox, budget=2_000_000)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from stealguard.attacks.base import ATTACKS
from stealguard.attacks.datafree import DataFreeAttack, DataFreeParams
from stealguard.models.generators import GeneratorConfig


class DFMEParams(DataFreeParams):
    """DFME's settings (defaults: the authors' code). Unknown fields are refused."""

    generator: GeneratorConfig = Field(default_factory=lambda: GeneratorConfig(arch="dfme"),
                                       description="the registered generator and its sizes")
    logit_correction: Literal["mean", "min", "none"] = Field(
        "mean", description="the constant taken from log p: mean, min or none")


def recover_logits(probs: torch.Tensor, *, floor: float, correction: str) -> torch.Tensor:
    """(B, K) probabilities -> logits up to a per-row constant (DFME Eq. 6)."""
    logp = probs.clamp_min(floor).log()  # (B, K)
    if correction == "mean":
        return logp - logp.mean(1, keepdim=True)
    if correction == "min":
        return logp - logp.min(1, keepdim=True).values
    return logp


@ATTACKS.register("dfme")
class DFME(DataFreeAttack):
    """Data-free model extraction with L1 on recovered logits. See the module docstring."""

    Params: ClassVar[type[DFMEParams]] = DFMEParams
    params: DFMEParams

    def _target(self, answers: torch.Tensor) -> torch.Tensor:
        return recover_logits(answers, floor=self.params.prob_floor,
                              correction=self.params.logit_correction)

    def clone_loss(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(logits, self._target(answers))

    def disagreement(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return (logits - self._target(answers)).abs().mean(1)  # (B,)
