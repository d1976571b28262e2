"""JB-self: Jacobian augmentation toward the clone's own most likely class.

Juuti, Szyller, Marchal, Asokan. "PRADA: Protecting Against DNN Model Stealing Attacks",
EuroS&P 2019, as the MAD paper describes it (Orekondy et al., ICLR 2020, appendix D): "in
jb-self [the Jacobian is calculated] w.r.t the maximum a posterior class predicted by F_A".
As a targeted step (the sign of the MAD authors' code):

    x' = x - lambda * sign(grad_x L(F_A(x), argmax_c F_A(x)_c)),   clipped to [0, 1]

The rounds are JBDA's (jacobian.py); the MAD preset is the paper's setting.

    attack = JBSelf(mnist_train, {"preset": "mad"})
"""

from __future__ import annotations

import torch

from stealguard.attacks.base import ATTACKS
from stealguard.attacks.jacobian import JacobianAttack, sign_gradient
from stealguard.models import Classifier
from stealguard.training import predict


@ATTACKS.register("jb_self")
class JBSelf(JacobianAttack):
    """JBDA with targeted steps toward the clone's own prediction."""

    def augment(self, clone: Classifier, x: torch.Tensor, answers: torch.Tensor, *,
                step: float, generator: torch.Generator) -> torch.Tensor:
        dev = next(clone.parameters()).device
        y_self = predict(clone, x, device=dev).argmax(1)  # (B,) the clone's MAP class
        grad_sign = sign_gradient(clone, x, y_self, grad_batch=self.jacobian.grad_batch)
        return (x - step * grad_sign).clamp(0.0, 1.0)  # (B, C, H, W)
