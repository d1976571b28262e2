"""DP-SGD victim training, the `dp-sgd` baseline of the MAD paper.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1: each step
clips every per-sample gradient to L2 norm C and adds Gaussian noise N(0, σ² C² I) to their
sum,
    g̃ = (1 / L) (Σ_i g_i / max(1, ||g_i||_2 / C) + N(0, σ² C² I)),
with lots drawn by Poisson sampling (rate L / N). Orekondy et al., "Prediction Poisoning",
ICLR 2020, sec. 5.1 (iii) use it as a baseline that randomises the victim's parameters
instead of its answers. Implemented with Opacus (`pip install opacus`), which also reports the
privacy spent (ε at the given δ, PRV accountant).

BatchNorm mixes samples and cannot be trained privately: Opacus's `ModuleValidator.fix`
replaces it with GroupNorm, so a BN architecture comes back changed (`log.replaced_modules`).

    model, log = train_dp(model, images, labels, config=TrainConfig(epochs=30, lr=0.1),
                          noise_multiplier=1.1, max_grad_norm=1.0)
    log.epsilon   # privacy spent at log.delta
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stealguard.data.augment import augment_batch
from stealguard.errors import ConfigError
from stealguard.training import (
    TrainConfig,
    TrainLog,
    make_optimizer,
    make_schedule,
    resolve_device,
    seed_everything,
    to_float_images,
)


@dataclass
class DPTrainLog(TrainLog):
    epsilon: float = float("inf")
    delta: float = 0.0
    replaced_modules: bool = False


def _check(noise_multiplier: float, max_grad_norm: float, delta: float) -> None:
    if not 0 <= noise_multiplier < float("inf"):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 < max_grad_norm < float("inf"):
        raise ConfigError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def _private_copy(model: nn.Module) -> tuple[nn.Module, bool]:
    """A copy Opacus can train: BatchNorm -> GroupNorm, no in-place activations."""
    try:
        from opacus.validators import ModuleValidator
    except ImportError:
        raise ConfigError("DP-SGD training needs opacus: pip install opacus") from None
    replaced = bool(ModuleValidator.validate(model, strict=False))
    fixed = ModuleValidator.fix(model)  # a copy
    for m in fixed.modules():
        if hasattr(m, "inplace"):
            m.inplace = False  # Opacus's backward hooks forbid in-place ops on hooked outputs
    return fixed, replaced


def _epoch(dp_model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
           sched: torch.optim.lr_scheduler.LRScheduler | None, cfg: TrainConfig,
           dev: torch.device) -> float:
    """One pass over the Poisson-sampled lots; returns the mean training loss."""
    total, count = 0.0, 0
    for xb, yb in loader:
        xb, yb = to_float_images(xb.to(dev)), yb.to(dev)
        if cfg.augment and len(xb):
            xb = augment_batch(xb, crop_padding=cfg.crop_padding, flip=cfg.flip)
        logits = dp_model(xb)
        # an empty Poisson lot still takes its (pure-noise) step, as the accountant assumes
        loss = nn.functional.cross_entropy(logits, yb) if len(xb) else logits.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total, count = total + loss.item() * len(yb), count + len(yb)
    return total / max(count, 1)


def train_dp(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, config: TrainConfig,
    noise_multiplier: float, max_grad_norm: float, delta: float = 1e-5,
    device: str | torch.device | None = "cpu",
) -> tuple[nn.Module, DPTrainLog]:
    """Train a private copy of `model` on images (N, C, H, W), labels (N,) with DP-SGD.

    Returns the trained model (a copy; BatchNorm replaced by GroupNorm) and its log, with
    the privacy spent `epsilon` at `delta`. `config.batch_size` is the expected lot size;
    the optimizer and the cosine / constant schedule are built by `stealguard.training`
    (`make_optimizer`, `make_schedule`), as in `train`. This is not `train`'s loop: Opacus
    needs Poisson-sampled lots from its DataLoader, and every lot, even an empty or a
    one-image one, takes its step (the privacy accountant assumes it), so the batching rule
    of `train` (drop a final batch of one) does not apply here.
    """
    from opacus import PrivacyEngine

    _check(noise_multiplier, max_grad_norm, delta)
    cfg, dev = config, resolve_device(device)
    seed_everything(cfg.seed)
    private, replaced = _private_copy(model)
    private.to(dev).train()
    loader = DataLoader(TensorDataset(images, labels.long()), batch_size=cfg.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure_mode is off", and Opacus's hook notices
        engine = PrivacyEngine()
        dp_model, opt, loader = engine.make_private(
            module=private, optimizer=make_optimizer(private, cfg), data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            noise_generator=torch.Generator(device=dev).manual_seed(cfg.seed + 1))
        sched = make_schedule(opt, cfg, cfg.epochs * len(loader))
        log, t0 = DPTrainLog(delta=delta, replaced_modules=replaced), time.perf_counter()
        for epoch in range(cfg.epochs):
            loss = _epoch(dp_model, opt, loader, sched, cfg, dev)
            log.epochs.append({"epoch": epoch + 1, "loss": loss})
        log.seconds = time.perf_counter() - t0
        log.samples_per_second = len(labels) * cfg.epochs / max(log.seconds, 1e-9)
        if noise_multiplier > 0:  # no noise: no privacy (and the accountant would overflow)
            log.epsilon = float(engine.get_epsilon(delta))
    return dp_model.to_standard_module().eval(), log
