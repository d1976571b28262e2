"""JB-top3: Jacobian augmentation toward each of the clone's k nearest other classes.

Juuti, Szyller, Marchal, Asokan. "PRADA: Protecting Against DNN Model Stealing Attacks",
EuroS&P 2019, as the MAD paper describes it (Orekondy et al., ICLR 2020, appendix D): "in
jbtop3, the jacobian is calculated w.r.t. to k nearest classes". For each point x with
answered label y, the k classes c_1..c_k the clone ranks highest apart from y (the MAD
authors' code) each give a new point, a targeted step:

    x'_j = x - lambda * sign(grad_x L(F_A(x), c_j)),   j = 1..k,   clipped to [0, 1]

so a round makes k points (and k queries) per point. All B * k steps are one batched
backward pass. The rounds are JBDA's (jacobian.py).

    attack = JBTop3(mnist_train, {"preset": "mad", "k": 3})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from stealguard.attacks.base import ATTACKS, AttackParams
from stealguard.attacks.jacobian import JacobianAttack, JacobianParams, sign_gradient
from stealguard.data import ImageDataset
from stealguard.models import Classifier
from stealguard.training import predict


class JBTop3Params(JacobianParams):
    k: int = Field(3, ge=1, description="target classes per point, >= 1 (each a query)")


@ATTACKS.register("jb_top3")
class JBTop3(JacobianAttack):
    """JBDA with k targeted steps per point, toward the clone's top-k other classes.

    Args: as JacobianAttack; params add k: classes per point (3).
    """

    Params: ClassVar[type[AttackParams]] = JBTop3Params

    def __init__(self, data: ImageDataset | torch.Tensor | None,
                 params: BaseModel | Mapping[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(data, params, **kw)
        assert isinstance(self.params, JBTop3Params)
        self.points_per_image = self.params.k

    def augment(self, clone: Classifier, x: torch.Tensor, answers: torch.Tensor, *,
                step: float, generator: torch.Generator) -> torch.Tensor:
        b, num_classes = answers.shape
        k = min(self.points_per_image, num_classes - 1)
        dev = next(clone.parameters()).device
        logits = predict(clone, x, device=dev)  # (B, K)
        logits[torch.arange(b), answers.argmax(1)] = float("-inf")  # drop the answered label
        targets = logits.topk(k, dim=1).indices  # (B, k), nearest first
        x_rep = x.repeat_interleave(k, dim=0)  # (B*k, C, H, W): point i's k copies adjacent
        grad_sign = sign_gradient(clone, x_rep, targets.reshape(-1),
                                  grad_batch=self.jacobian.grad_batch)
        return (x_rep - step * grad_sign).clamp(0.0, 1.0)  # (B*k, C, H, W)
