"""MAZE: data-free model stealing with zeroth-order gradient estimation.

Kariyappa, Prakash, Qureshi. "MAZE: Data-Free Model Stealing Attack Using Zeroth-Order
Gradient Estimation", CVPR 2021. A generator G and the clone C play (the loop is in
datafree.py):

    L_C = D_KL(T(x) || C(x)),      L_G = -D_KL(T(x) || C(x)),   x = G(z), z ~ N(0, I)  (Eq. 1-2)

T(x) the target's probabilities, C(x) = softmax of the clone's logits. L_G's gradient
w.r.t. x is the zeroth-order estimate (Eq. 4), m = 10 random directions u_i uniform on the
unit sphere, smoothing mu = 1e-3, d = C*H*W:

    grad_x L_G ~= (1/m) sum_i  d * [L_G(x + mu u_i) - L_G(x)] / mu * u_i,

then back-propagated through G (Eq. 3). Experience replay (section 3.3): the queries of
earlier rounds and their answers are kept, and each round ends with n_R clone steps on
batches drawn from them (no new queries).

Settings of the authors' code (sanjaykariyappa/MAZE): B = 128, n_G = 1, n_S = 5, n_R = 10,
the round's unperturbed points reused as the first clone batch, so a round costs
B * ((m + 1) n_G + n_S - 1) = 1920 queries; C and G trained by SGD (momentum 0.9, weight
decay 5e-4) with cosine annealing over the rounds, C at lr 0.1, G at 1e-4 (their
FashionMNIST command: 1e-3); generator conv3_gen (nz 100).

Ours differs in two places, both stated: the replay memory is a uniform reservoir sample of
at most `replay_size` rows (the authors keep every row in memory), and every clone batch is
stored (the authors store the last one of each round).

    attack = build_attack("maze", None, {"replay_size": 50_000})
    result = attack(blackbox, budget=2_000_000)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from stealguard.attacks.base import ATTACKS
from stealguard.attacks.datafree import DataFreeAttack, DataFreeParams, Reservoir
from stealguard.blackbox import BlackBox
from stealguard.models import Classifier
from stealguard.models.generators import Generator, GeneratorConfig


class MAZEParams(DataFreeParams):
    """MAZE's settings (defaults: the authors' code). Unknown fields are refused."""

    generator: GeneratorConfig = Field(default_factory=lambda: GeneratorConfig(arch="maze"),
                                       description="the registered generator and its sizes")
    batch: int = Field(128, ge=1, description="B: images per generator / clone step, >= 1")
    directions: int = Field(10, ge=1, description="m: random directions per image, >= 1")
    generator_optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd or adam")
    schedule: Literal["multistep", "cosine", "constant"] = Field(
        "cosine", description="both learning rates over the rounds: multistep, cosine, "
        "constant")
    replay_steps: int = Field(10, ge=0, description="n_R: replay clone steps per round, >= 0")
    replay_size: int = Field(50_000, ge=1, description="rows the replay memory keeps, >= 1")


def kl_to_clone(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(B,) D_KL(probs || softmax(logits)) per row; 0 log 0 = 0 (one-hot answers are fine)."""
    logq = F.log_softmax(logits, dim=1)
    return (torch.xlogy(probs, probs) - probs * logq).sum(1)


@ATTACKS.register("maze")
class MAZE(DataFreeAttack):
    """MAZE with KL losses and experience replay. See the module docstring."""

    Params: ClassVar[type[MAZEParams]] = MAZEParams
    params: MAZEParams

    def round_queries(self) -> int:
        p = self.params
        return p.batch * (p.generator_steps * (p.directions + 1) + p.clone_steps - 1)

    def clone_loss(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return kl_to_clone(logits, answers).mean()

    def disagreement(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return kl_to_clone(logits, answers)

    def run(self, blackbox: BlackBox, budget: int):  # type: ignore[no-untyped-def]
        self._reused: tuple[torch.Tensor, torch.Tensor] | None = None
        self.memory = Reservoir(self.params.replay_size,
                                generator=torch.Generator().manual_seed(self.params.seed + 1))
        return super().run(blackbox, budget)

    def on_generator_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._reused = (x.detach(), y)  # the last generator step's unperturbed points

    def next_clone_batch(self, gen: Generator, blackbox: BlackBox, n: int, step: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 0 and self._reused is not None and self._reused[0].shape[0] == n:
            batch, self._reused = self._reused, None  # already paid for by the ZO query
            return batch
        return self.clone_batch(gen, blackbox, n)

    def on_clone_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.memory.add(x, y)

    def after_round(self, clone: Classifier, opt: torch.optim.Optimizer) -> int:
        if self.memory.size == 0:
            return 0
        for _ in range(self.params.replay_steps):
            x, y = self.memory.sample(self.params.batch)
            x, y = x.to(self.device), y.to(self.device)
            loss = self.clone_loss(clone(x), self.answers_for_loss(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return 0
