"""The black box: the one way anything queries a model.

`query(x)` takes float images in [0, 1], (B, C, H, W), and returns what the API would
return, (B, K): probabilities, top-k probabilities (renormalised), or a one-hot label.
It counts every answered row against a budget, and refuses a batch that would cross the
budget whole (nothing of it is answered, nothing counted).

    bb = LocalBlackBox(victim, budget=50_000, output="probs")
    y = bb.query(x)          # (B, K)
    bb.queries_used          # == B

With `monitor=` (stealguard.detect), every answered batch is shown to the monitor's
detectors under the key `client`, and its policy may refuse a flagged client; the answers
themselves never change.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from stealguard.defenses.base import Defense, NoDefense
from stealguard.errors import ConfigError, InputError, QueryBudgetExceeded
from stealguard.training import resolve_device

if TYPE_CHECKING:
    from stealguard.detect.monitor import Monitor

OutputMode = Literal["probs", "topk", "label"]
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)


def format_output(probs: torch.Tensor, mode: str, k: int = 1) -> torch.Tensor:
    """Turn (B, K) probabilities into what an API in `mode` returns, (B, K).

    topk keeps the k largest probabilities and renormalises them to sum to 1 (our choice:
    the papers' top-k baseline does not say; renormalising keeps every answer a distribution).
    label returns the one-hot argmax.
    """
    if mode == "probs":
        return probs
    if mode == "label":
        return nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    if mode == "topk":
        vals, idx = probs.topk(min(k, probs.shape[1]), dim=1)  # (B, k)
        out = torch.zeros_like(probs).scatter_(1, idx, vals)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)
    raise ConfigError(f"unknown output mode {mode!r}; valid: {', '.join(OUTPUT_MODES)}")


def validate_images(x: object, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Check a query batch and return it as float32 (B, C, H, W) in [0, 1].

    Accepts float tensors in [0, 1] or uint8 tensors (0..255). Refuses anything else with a
    message that gives the expected shape.
    """
    c, h, w = input_shape
    expected = f"a float tensor of shape (B, {c}, {h}, {w}) with values in [0, 1]"
    if not isinstance(x, torch.Tensor):
        raise InputError(f"query expects {expected}, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise InputError(f"query expects {expected}, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.dtype.is_floating_point:
        raise InputError(f"query expects {expected} (or uint8 pixels), got dtype {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError("query images contain NaN or infinite values")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise InputError(
            f"query expects {expected}, got values in [{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    return x.clamp_(0.0, 1.0)


class BlackBox(ABC):
    """Query interface with exact, thread-safe accounting against an optional budget."""

    input_shape: tuple[int, int, int]
    num_classes: int

    def __init__(self, *, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0, got {budget}")
        self.budget = budget
        self.queries_used = 0
        self._lock = threading.Lock()
        self.monitor: Monitor | None = None  # stealing detectors (stealguard.detect)
        self.client = "local"  # the key the monitor files this black box's queries under

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries_used

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, K) answers; counts B queries."""
        x = validate_images(x, self.input_shape)
        n = int(x.shape[0])
        if self.monitor is not None:  # a policy may refuse a flagged client (nothing counted)
            self.monitor.admit(self.client, n)
        with self._lock:  # reserve the rows before answering, so concurrent callers can't overshoot
            if self.budget is not None and self.queries_used + n > self.budget:
                raise QueryBudgetExceeded(n, self.queries_used, self.budget)
            self.queries_used += n
        try:
            out = self._answer(x)
        except BaseException:
            with self._lock:  # nothing answered: give the reservation back
                self.queries_used -= n
            raise
        if self.monitor is not None:  # the detectors see the answered batch; answers unchanged
            self.monitor.observe(self.client, x)
        return out

    @abstractmethod
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a validated batch (B, C, H, W) -> (B, K)."""


def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K) probabilities. Models with their own `predict_proba` (an EDM
    ensemble routes each image to one member) are asked directly; others return logits."""
    own = getattr(model, "predict_proba", None)
    if callable(own):
        return own(x)
    return torch.softmax(model(x).float(), dim=1)


class LocalBlackBox(BlackBox):
    """A model in this process (optionally defended) behind the query interface."""

    def __init__(
        self, model: nn.Module, *, defense: Defense | None = None, budget: int | None = None,
        output: str = "probs", k: int = 1, device: str | torch.device | None = "cpu",
        batch_size: int = 1024, monitor: Monitor | None = None, client: str = "local",
    ) -> None:
        super().__init__(budget=budget)
        self.monitor, self.client = monitor, client
        if output not in OUTPUT_MODES:
            raise ConfigError(f"unknown output mode {output!r}; valid: {', '.join(OUTPUT_MODES)}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.defense = defense or NoDefense()
        self.output, self.k, self.batch_size = output, k, batch_size
        self.input_shape = tuple(model.input_shape)  # type: ignore[assignment]
        self.num_classes = int(model.num_classes)  # type: ignore[arg-type]

    @torch.no_grad()
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for xb in x.split(self.batch_size):
            xb = xb.to(self.device, non_blocking=True)
            probs = predict_proba(self.model, xb)  # (b, K)
            probs = self.defense(xb, probs)
            outs.append(format_output(probs, self.output, self.k).float().cpu())
        if not outs:
            return torch.zeros(0, self.num_classes)
        return torch.cat(outs)
