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
from typing import TYPE_CHECKING, Any

import torch

from stealguard.defended import OUTPUT_MODES, DefendedPredictor, OutputMode, format_output
from stealguard.defenses.base import Defense
from stealguard.errors import ConfigError, InputError, QueryBudgetExceeded
from stealguard.training import resolve_device
from stealguard.victim import predict_proba

if TYPE_CHECKING:
    from stealguard.detect.monitor import Monitor

__all__ = ["OUTPUT_MODES", "BlackBox", "DefendedPredictor", "LocalBlackBox", "OutputMode",
           "format_output", "predict_proba", "validate_images"]


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


class LocalBlackBox(BlackBox):
    """A model in this process (optionally defended) behind the query interface: a budget in
    front of a `DefendedPredictor` (which computes every answer)."""

    def __init__(
        self, model: Any, *, defense: Defense | None = None, budget: int | None = None,
        output: str = "probs", k: int = 1, device: str | torch.device | None = "cpu",
        batch_size: int = 1024, monitor: Monitor | None = None, client: str = "local",
    ) -> None:
        super().__init__(budget=budget)
        self.monitor, self.client = monitor, client
        self.predictor = DefendedPredictor(model, defense, output=output, k=k,
                                           device=resolve_device(device), batch_size=batch_size)
        self.model, self.defense = self.predictor.model, self.predictor.defense
        self.device, self.output, self.k = self.predictor.device, output, k
        self.batch_size = batch_size
        self.input_shape = self.predictor.input_shape
        self.num_classes = self.predictor.num_classes

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict_proba(x)
