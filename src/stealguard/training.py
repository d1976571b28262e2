"""The one training loop: victims, clones, EDM members, outlier exposure, misinformation.

    train(model, images, targets, config=cfg)                       # cross-entropy
    train(model, images, labels, config=cfg, loss=my_loss,          # any objective,
          extras={"ood": ExtraBatches(ood_images, batch_size=32)})  # with extra batches

The whole dataset sits on the training device as uint8 (N, C, H, W); each step indexes a
batch, converts to float in [0, 1] and augments it there (batched crop + flip), so there is
no per-sample Python and no DataLoader worker. Targets are hard labels (N,) int64 or soft
probability vectors (N, K) float. On CUDA the forward pass runs in bfloat16 autocast; the
loss always sees float32 logits.

A step hands the loss a `Batch`: the augmented images x (B, C, H, W), their targets, and one
batch from each extra stream (e.g. EDM's OOD images, Outlier Exposure's outliers), drawn
from the same seeded generator. The loss returns what to descend and what to log.

Batches (one rule for every caller): each epoch is a fresh permutation cut into batches of
`batch_size`; a final batch of one image is dropped (unless the set is one image), because
BatchNorm cannot normalise over one sample; the cosine schedule runs over the steps taken.
Extra streams are not augmented (the paper's OOD / outlier sets are used as they are).

Layout: `channels_last=True` trains a model with 2-D convolutions in channels-last (NHWC)
memory format, weights and batches, and hands it back in the default layout: on this
project's 2-core CPU oneDNN's NHWC convolutions and max-pooling run about 1.3x faster than
NCHW (BENCHMARKS.md). It is off by default: each step then differs from NCHW by float
rounding only (1e-8), but training amplifies that, and the stored quick results move (the
EDM hash network's held-out accuracy 89.8 -> 91.2 %, which reroutes the queries and moved a
hard-label EDM clone from 44.0 to 30.8 %). Stored numbers stay unless a run asks for it.

DP-SGD (`defenses/dp_sgd.py`) needs Opacus's per-sample gradients and Poisson lots, so it
keeps its own loop but builds its optimizer and schedule here (`make_optimizer`,
`make_schedule`).

The final model is what is reported: nothing here selects a checkpoint on a test set.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from stealguard.data.augment import augment_batch
from stealguard.errors import InputError


class TrainConfig(BaseModel):
    """Training hyper-parameters. Unknown fields are refused (a typo is an error)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adagrad"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: bool = False
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    seed: int = 0
    amp: bool = True  # bfloat16 autocast, CUDA only


@dataclass
class TrainLog:
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda if available else cpu; a CUDA request without CUDA is an error,
    and so is a name torch does not know ('tpu', 'gpu')."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use --device {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use --device {DEVICE_CHOICES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return dev


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                  ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine annealing over `total_steps` optimizer steps (stepped once per step), or None."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return None


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Start offsets of one epoch's batches: the batching rule of the module docstring (a
    final batch of one is dropped when n > 1)."""
    starts = list(range(0, n, batch_size))
    if n > 1 and starts and n - starts[-1] == 1:
        starts.pop()
    return starts


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard labels (B,) or probability targets (B, K)."""
    if targets.dim() == 1:
        return nn.functional.cross_entropy(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] -> float32 [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ------------------------------------------------------------------ pluggable parts


@dataclass
class Batch:
    """What one step's loss sees."""

    x: torch.Tensor  # (B, C, H, W) float in [0, 1], augmented when config.augment
    y: torch.Tensor  # (B,) int64 labels or (B, K) float probabilities
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B', C, H, W)


class StepLoss(NamedTuple):
    value: torch.Tensor  # the scalar that is descended
    logged: dict[str, torch.Tensor]  # detached scalars, logged per epoch ("loss" at least)


Forward = Callable[[torch.Tensor], torch.Tensor]  # images -> float32 logits (autocast inside)
Loss = Callable[[Forward, Batch], StepLoss]


def cross_entropy_loss(forward: Forward, batch: Batch) -> StepLoss:
    """The default objective: (soft) cross-entropy of the model on the batch."""
    loss = soft_cross_entropy(forward(batch.x), batch.y)
    return StepLoss(loss, {"loss": loss.detach()})


@dataclass
class ExtraBatches:
    """An extra image set drawn alongside the training batches, `batch_size` images a step
    (default: the training batch size), cycled: a fresh permutation each pass, the incomplete
    tail of a pass dropped (a set smaller than one batch is used whole)."""

    images: torch.Tensor  # (M, C, H, W) uint8 or float
    batch_size: int | None = None

    def stream(self, default_batch: int, gen: torch.Generator, device: torch.device
               ) -> Iterator[torch.Tensor]:
        x, batch = self.images.to(device), self.batch_size or default_batch
        last = len(x) - batch + 1 if len(x) >= batch else 1
        while True:
            perm = torch.randperm(len(x), device=device, generator=gen)
            for start in range(0, last, batch):
                yield to_float_images(x[perm[start:start + batch]])


# ------------------------------------------------------------------ the loop


def _check_targets(images: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
    if images.dim() != 4 or images.shape[0] != targets.shape[0]:
        raise InputError(
            f"train expects images (N, C, H, W) and N targets, got {tuple(images.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if targets.dim() == 2 and targets.shape[1] != num_classes:
        raise InputError(f"soft targets have {targets.shape[1]} classes, model has {num_classes}")
    if targets.dim() == 1 and targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got "
                         f"[{targets.min().item()}, {targets.max().item()}]")


def _layout(model: nn.Module, channels_last: bool) -> torch.memory_format | None:
    """channels_last when asked for and the model has 4-D (conv) weights, else None."""
    if channels_last and any(p.dim() == 4 for p in model.parameters()):
        return torch.channels_last
    return None


def _extras_shape(images: torch.Tensor, extras: Mapping[str, ExtraBatches]) -> None:
    for name, e in extras.items():
        if e.images.dim() != 4 or e.images.shape[1:] != images.shape[1:] or not len(e.images):
            raise InputError(f"extra batches {name!r} must be images shaped like the training "
                             f"images {tuple(images.shape[1:])}, got {tuple(e.images.shape)}")


def train(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, config: TrainConfig,
    device: str | torch.device | None = "cpu", progress: bool = True, desc: str = "train",
    loss: Loss = cross_entropy_loss, extras: Mapping[str, ExtraBatches] | None = None,
    on_epoch: Callable[[int, nn.Module], bool | None] | None = None,
    channels_last: bool = False,
) -> TrainLog:
    """Train `model` in place on images (N, C, H, W) and targets (N,) or (N, K), descending
    `loss` (default: cross-entropy) with one batch of each of `extras` per step.
    channels_last: train in NHWC layout (faster on a CPU; see the module docstring).

    on_epoch(epoch, model): called after each epoch (1-based); returning True stops training
    there (for time-to-accuracy measurements; the schedule is not shortened)."""
    cfg, dev, extras = config, resolve_device(device), dict(extras or {})
    num_classes = int(getattr(model, "num_classes", targets.shape[-1]))
    _check_targets(images, targets, num_classes)
    _extras_shape(images, extras)
    seed_everything(cfg.seed)
    model.to(dev).train()
    layout = _layout(model, channels_last)
    if layout is not None:
        model.to(memory_format=layout)  # type: ignore[call-overload]
    x_all = images.to(dev)  # whole dataset on the device, uint8 stays small
    y_all = targets.to(dev).float() if targets.dim() == 2 else targets.to(dev).long()
    n = int(x_all.shape[0])
    starts = batch_starts(n, cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, cfg.epochs * len(starts))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    streams = {k: e.stream(cfg.batch_size, gen, dev) for k, e in extras.items()}
    use_amp = cfg.amp and dev.type == "cuda"

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(x).float()

    log, t0 = TrainLog(), time.perf_counter()
    # One bar step per optimizer step (an epoch can take minutes on a CPU).
    bar = tqdm(total=cfg.epochs * len(starts), desc=desc, unit="step", disable=not progress,
               leave=False)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, device=dev, generator=gen)
        total, sums = 0, {}  # type: ignore[var-annotated]
        for start in starts:
            idx = perm[start:start + cfg.batch_size]
            xb = to_float_images(x_all[idx])
            if cfg.augment:
                xb = augment_batch(xb, crop_padding=cfg.crop_padding, flip=cfg.flip, generator=gen)
            extra = {k: next(s) for k, s in streams.items()}
            if layout is not None:
                xb = xb.contiguous(memory_format=layout)
                extra = {k: v.contiguous(memory_format=layout) for k, v in extra.items()}
            step = loss(forward, Batch(xb, y_all[idx], extra))
            opt.zero_grad(set_to_none=True)
            step.value.backward()
            opt.step()
            if sched is not None:
                sched.step()
            for k, v in step.logged.items():  # summed over images, no device sync per step
                sums[k] = sums.get(k, 0) + v * idx.numel()
            total += idx.numel()
            bar.update(1)
        record = {k: (v / max(total, 1)).item() for k, v in sums.items()}
        log.epochs.append({"epoch": epoch + 1, **record})
        if "loss" in record:
            bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}")
        if on_epoch is not None and on_epoch(epoch + 1, model):
            break
    bar.close()
    log.seconds = time.perf_counter() - t0
    log.samples_per_second = n * len(log.epochs) / max(log.seconds, 1e-9)
    if layout is not None:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    model.eval()
    return log


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, device: str | torch.device | None = "cpu",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Logits (N, K) of `model` on images (N, C, H, W) (uint8 or float in [0, 1]), on CPU."""
    dev = resolve_device(device)
    model.to(dev).eval()
    outs = [model(to_float_images(xb.to(dev))).float().cpu() for xb in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, int(getattr(model, "num_classes", 0)))


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
    device: str | torch.device | None = "cpu", batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of the model as it is (the final model, never a checkpoint)."""
    preds = predict(model, images, device=device, batch_size=batch_size).argmax(1)
    return float((preds == labels.cpu()).float().mean().item())
