"""JBDA-TR: Jacobian augmentation toward a random target class.

Juuti, Szyller, Marchal, Asokan. "PRADA: Protecting Against DNN Model Stealing Attacks",
EuroS&P 2019 (the T-RND variant of Papernot's augmentation), as the EDM paper writes it
(section 5.1):

    x'_i = x_i - lambda * sign(grad_x L(C(x_i; theta_c), y_T)),   y_T a random target class

y_T is drawn uniformly among the classes other than the answered label (a step toward the
label the point already has would not be a targeted misclassification); pixels clipped to
[0, 1]. The rounds are JBDA's (jacobian.py); EDM uses JBDA's settings for it.

    attack = JBDATR(mnist_train, {"preset": "edm"})
"""

from __future__ import annotations

import torch

from stealguard.attacks.base import ATTACKS
from stealguard.attacks.jacobian import JacobianAttack, sign_gradient
from stealguard.models import Classifier


@ATTACKS.register("jbda_tr")
class JBDATR(JacobianAttack):
    """JBDA with targeted steps toward a random other class y_T."""

    def augment(self, clone: Classifier, x: torch.Tensor, answers: torch.Tensor, *,
                step: float, generator: torch.Generator) -> torch.Tensor:
        b, k = answers.shape
        shift = torch.randint(1, max(k, 2), (b,), generator=generator)  # (B,) in [1, K)
        y_t = (answers.argmax(1) + shift) % k  # (B,) never the answered label
        grad_sign = sign_gradient(clone, x, y_t, grad_batch=self.jacobian.grad_batch)
        return (x - step * grad_sign).clamp(0.0, 1.0)  # (B, C, H, W)
