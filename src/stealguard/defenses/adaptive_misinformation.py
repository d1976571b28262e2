"""Adaptive Misinformation: answer out-of-distribution queries with a model trained to be wrong.

Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with Adaptive
Misinformation", CVPR 2020, sec. 4:

- the victim f is trained with Outlier Exposure (Hendrycks et al., ICLR 2019) so that its
  maximum probability separates in- from out-of-distribution inputs:
      L = E_in[ CE(f(x), y) ] + λ E_out[ CE(f(x), uniform) ]                  (OE, λ = 0.5)
- a misinformation model f̂ is trained to put little mass on the true class:
      L = E_in[ -log(1 - f̂(x)_y) ]
- the answer blends the two by a sigmoid of the victim's confidence:
      ỹ = (1 - α) f(x) + α f̂(x),   α = σ(ν (τ - max_k f(x)_k))              (ν = 1000)
  τ (in [0, 1]) sweeps the defender-accuracy / clone-accuracy trade-off curve.

    misinfo = build_model(...); train_misinformation(misinfo, images, labels, config=cfg)
    am = AdaptiveMisinformation(misinformation_model=misinfo, tau=0.5)
    y_tilde = am(x, victim_probs)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from stealguard.data.augment import augment_batch
from stealguard.defenses.base import DEFENSES, CheckedDefense, Defense, DefenseParams
from stealguard.errors import ConfigError
from stealguard.training import (
    TrainConfig,
    TrainLog,
    make_optimizer,
    resolve_device,
    seed_everything,
    to_float_images,
)


class AdaptiveMisinformationParams(DefenseParams):
    tau: float = Field(0.5, ge=0, le=1, description="confidence threshold, 0 <= tau <= 1")
    nu: float = Field(1000.0, ge=0, allow_inf_nan=False, description="sigmoid sharpness, nu >= 0")


@DEFENSES.register("adaptive_misinformation")
class AdaptiveMisinformation(CheckedDefense):
    Params = AdaptiveMisinformationParams

    def __init__(self, *, misinformation_model: nn.Module, tau: float = 0.5,
                 nu: float = 1000.0) -> None:
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
                          logits_out: torch.Tensor, *, weight: float = 0.5) -> torch.Tensor:
    """CE on in-distribution data + weight * CE(uniform, f(x_out)) on outliers."""
    uniform_ce = -torch.log_softmax(logits_out, dim=1).mean(1).mean()
    return nn.functional.cross_entropy(logits_in, labels) + weight * uniform_ce


# ------------------------------------------------------------------ training


StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, config: TrainConfig,
         device: str | torch.device | None, loss: StepLoss) -> TrainLog:
    """Mini-batch SGD over (images uint8/float (N, C, H, W), labels (N,)) with `loss`."""
    cfg, dev = config, resolve_device(device)
    seed_everything(cfg.seed)
    model.to(dev).train()
    x_all, y_all = images.to(dev), labels.to(dev).long()
    n = int(x_all.shape[0])
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * max(1, math.ceil(n / cfg.batch_size))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
             if cfg.schedule == "cosine" else None)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    log, t0 = TrainLog(), time.perf_counter()
    for epoch in range(cfg.epochs):
        perm, total = torch.randperm(n, device=dev, generator=gen), 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb = to_float_images(x_all[idx])
            if cfg.augment:
                xb = augment_batch(xb, crop_padding=cfg.crop_padding, flip=cfg.flip, generator=gen)
            value = loss(model, xb, y_all[idx], gen)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += value.item() * idx.numel()
        log.epochs.append({"epoch": epoch + 1, "loss": total / max(n, 1)})
    log.seconds = time.perf_counter() - t0
    log.samples_per_second = n * cfg.epochs / max(log.seconds, 1e-9)
    model.eval()
    return log


def train_misinformation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         config: TrainConfig, device: str | torch.device | None = "cpu"
                         ) -> TrainLog:
    """Train the misinformation model f̂ in place to minimise E[-log(1 - f̂(x)_y)]."""
    return _fit(model, images, labels, config=config, device=device,
                loss=lambda m, xb, yb, g: misinformation_loss(m(xb), yb))


def train_outlier_exposure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           outliers: torch.Tensor, *, config: TrainConfig,
                           weight: float = 0.5, device: str | torch.device | None = "cpu"
                           ) -> TrainLog:
    """Train the victim in place with Outlier Exposure; each step draws as many outliers
    (N_out, C, H, W) as in-distribution images, uniformly with replacement."""
    if outliers.dim() != 4 or outliers.shape[1:] != images.shape[1:]:
        raise ConfigError(f"outliers must be images shaped like the training images "
                          f"{tuple(images.shape[1:])}, got {tuple(outliers.shape)}")
    if not weight >= 0:
        raise ConfigError(f"outlier exposure weight must be >= 0, got {weight}")
    out_all = outliers.to(resolve_device(device))

    def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pick = torch.randint(0, out_all.shape[0], (xb.shape[0],), generator=g, device=g.device)
        xo = to_float_images(out_all[pick.to(out_all.device)])
        logits = m(torch.cat([xb, xo]))  # one pass: BatchNorm sees both
        return outlier_exposure_loss(logits[:len(yb)], yb, logits[len(yb):], weight=weight)

    return _fit(model, images, labels, config=config, device=device, loss=loss)
