"""Adaptive Misinformation: answer out-of-distribution queries with a model trained to be wrong.

Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with Adaptive
Misinformation", CVPR 2020, sec. 4:

- the victim f is trained with Outlier Exposure (Hendrycks et al., ICLR 2019) so that its
  maximum probability separates in- from out-of-distribution inputs:
      L = E_in[ CE(f(x), y) ] + λ E_out[ CE(f(x), uniform) ]                  (OE, λ = 1)
- a misinformation model f̂ is trained to put little mass on the true class:
      L = E_{in ∪ out}[ -log(1 - f̂(x)_y) ],  y = the label in-distribution and the victim's
                                             argmax f(x) on the outliers
- the answer blends the two by a sigmoid of the victim's confidence:
      ỹ = (1 - α) f(x) + α f̂(x),   α = σ(ν (τ - max_k f(x)_k))              (ν = 10000)
  τ (in [0, 1]) sweeps the defender-accuracy / clone-accuracy trade-off curve.

Where the paper leaves a value open we follow the authors' code
(github.com/sanjaykariyappa/adaptive_misinformation):
- ν = 10000 (`admis/utils/defense.py`: `1 / (1 + exp(-10000 * (delta - probs_max)))`);
- λ = 1 (the README's training command: `--oe_lamb 1`);
- f̂ is trained on the outliers as well as the training set, with the victim's argmax on
  the outliers as their "true" class (`admis/utils/model.py`, `train_step`): the queries AM
  answers with f̂ are the out-of-distribution ones, so f̂ must be wrong on those too.
Two differences remain, both documented where they happen: the authors train f and f̂ in
the same loop (f̂'s outlier labels come from f as it trains), we train f first and label the
outliers with the final f (the labels the defense then sees); their outlier loader is not
reshuffled, ours is (`ExtraBatches`, as EDM's OOD set and Hendrycks et al.'s OE code).

    train_outlier_exposure(victim, images, labels, outliers, config=cfg)
    train_misinformation(misinfo, images, labels, config=cfg, outliers=outliers, victim=victim)
    am = AdaptiveMisinformation(misinformation_model=misinfo, tau=0.5)
    y_tilde = am(x, victim_probs)
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from stealguard.defenses.base import DEFENSES, CheckedDefense, Defense, DefenseParams
from stealguard.errors import ConfigError
from stealguard.training import (
    Batch,
    ExtraBatches,
    Forward,
    StepLoss,
    TrainConfig,
    TrainLog,
    resolve_device,
    train,
)


class AdaptiveMisinformationParams(DefenseParams):
    tau: float = Field(0.5, ge=0, le=1, description="confidence threshold, 0 <= tau <= 1")
    nu: float = Field(10000.0, ge=0, allow_inf_nan=False,
                      description="sigmoid sharpness, nu >= 0 (the authors' code: 10000)")


@DEFENSES.register("adaptive_misinformation")
class AdaptiveMisinformation(CheckedDefense):
    Params = AdaptiveMisinformationParams

    def __init__(self, *, misinformation_model: nn.Module, tau: float = 0.5,
                 nu: float = 10000.0) -> None:
        if not 0 <= tau <= 1:
            raise ConfigError(f"adaptive_misinformation: tau must be in [0, 1], got {tau}")
        if not 0 <= nu < float("inf"):
            raise ConfigError(f"adaptive_misinformation: nu must be a finite number >= 0, got {nu}")
        self.misinformation_model = misinformation_model.eval()
        self.tau, self.nu = tau, nu

    @classmethod
    def from_params(cls, params: AdaptiveMisinformationParams, *,  # type: ignore[override]
                    victim: nn.Module | None = None, key: bytes | None = None,
                    misinformation_model: nn.Module | None = None, **components: Any) -> Defense:
        if misinformation_model is None:
            raise ConfigError("adaptive_misinformation needs misinformation_model= (a model "
                              "trained with train_misinformation)")
        return cls(misinformation_model=misinformation_model, tau=params.tau, nu=params.nu)

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        model = self.misinformation_model
        if next(model.parameters()).device != x.device:
            model.to(x.device)
        misinfo = torch.softmax(model(x).double(), dim=1)  # (B, K)
        y = probs.double()
        alpha = torch.sigmoid(self.nu * (self.tau - y.max(1, keepdim=True).values))  # (B, 1)
        return ((1 - alpha) * y + alpha * misinfo).to(probs.dtype)


# ------------------------------------------------------------------ losses


def misinformation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E[-log(1 - p_y)], with log(1 - p_y) = logsumexp_{k != y} z_k - logsumexp_k z_k."""
    others = logits.scatter(1, labels[:, None], -torch.inf)  # (B, K) without the true class
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


def outlier_exposure_loss(logits_in: torch.Tensor, labels: torch.Tensor,
                          logits_out: torch.Tensor, *, weight: float = 1.0) -> torch.Tensor:
    """CE on in-distribution data + weight * CE(uniform, f(x_out)) on outliers."""
    uniform_ce = -torch.log_softmax(logits_out, dim=1).mean(1).mean()
    return nn.functional.cross_entropy(logits_in, labels) + weight * uniform_ce


# ------------------------------------------------------------------ training
# Both models train with `stealguard.training.train`; the outliers are an extra batch stream
# of the training batch size (the authors' loader uses the same batch size for both).


def _outliers(images: torch.Tensor, outliers: torch.Tensor) -> ExtraBatches:
    if outliers.dim() != 4 or outliers.shape[1:] != images.shape[1:] or not len(outliers):
        raise ConfigError(f"outliers must be images shaped like the training images "
                          f"{tuple(images.shape[1:])}, got {tuple(outliers.shape)}")
    return ExtraBatches(outliers)


def train_misinformation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         config: TrainConfig, outliers: torch.Tensor | None = None,
                         victim: nn.Module | None = None,
                         device: str | torch.device | None = "cpu") -> TrainLog:
    """Train the misinformation model f̂ in place to minimise E[-log(1 - f̂(x)_y)] on the
    training set and, when given, on `outliers` (M, C, H, W) labelled by the trained
    `victim`'s argmax (as the authors' code; see the module docstring)."""
    if (outliers is None) != (victim is None):
        raise ConfigError("train_misinformation: give outliers= and victim= together (the "
                          "outliers are labelled by the victim's argmax), or neither")
    if outliers is None:
        return train(model, images, labels, config=config, device=device, progress=False,
                     loss=lambda fwd, b: _logged(misinformation_loss(fwd(b.x), b.y)))
    assert victim is not None
    extras = {"outliers": _outliers(images, outliers)}
    dev = resolve_device(device)
    victim = victim.to(dev).eval()

    def loss(forward: Forward, b: Batch) -> StepLoss:
        xo = b.extra["outliers"]  # (B', C, H, W)
        with torch.no_grad():
            yo = victim(xo).argmax(1)  # (B',) the class f̂ must avoid on an outlier
        return _logged(misinformation_loss(forward(torch.cat([b.x, xo])), torch.cat([b.y, yo])))

    return train(model, images, labels, config=config, device=dev, progress=False,
                 loss=loss, extras=extras)


def train_outlier_exposure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           outliers: torch.Tensor, *, config: TrainConfig,
                           weight: float = 1.0, device: str | torch.device | None = "cpu"
                           ) -> TrainLog:
    """Train the victim in place with Outlier Exposure; each step adds a batch of outliers
    (M, C, H, W) as large as the training batch, cycled through a reshuffled pass."""
    extras = {"outliers": _outliers(images, outliers)}
    if not weight >= 0:
        raise ConfigError(f"outlier exposure weight must be >= 0, got {weight}")

    def loss(forward: Forward, b: Batch) -> StepLoss:
        logits = forward(torch.cat([b.x, b.extra["outliers"]]))  # one pass: BatchNorm sees both
        n = len(b.y)
        return _logged(outlier_exposure_loss(logits[:n], b.y, logits[n:], weight=weight))

    return train(model, images, labels, config=config, device=device, progress=False,
                 loss=loss, extras=extras)


def _logged(value: torch.Tensor) -> StepLoss:
    return StepLoss(value, {"loss": value.detach()})
