"""The one defense interface: `(x, probs) -> probs`, batched.

x: (B, C, H, W) float images in [0, 1]; probs: (B, K) the model's probabilities.
A defense returns (B, K) probabilities (rows on the simplex). Defenses compose left to
right with `Compose` (for example EDM routing happens in the model, then MAD here).

Every defense is registered by name in `DEFENSES` with a typed parameter model
(`Defense.Params`, pydantic, unknown fields refused) so the CLI and experiment specs can
build it from `key=value` strings (see `build_defense` in `stealguard.defenses.builder`).
A defense also says what it guarantees, so one contract test can check every defense:
`preserves_argmax` (the top class never changes) and `budget` (dist(ỹ, y) <= epsilon).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from stealguard.errors import ConfigError, InputError
from stealguard.registry import Registry


class DefenseParams(BaseModel):
    """Typed, validated parameters of one defense. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(DefenseParams):
    """A defense without parameters."""


P = TypeVar("P", bound=DefenseParams)


def validate_params(defense: str, params_cls: type[P], values: Mapping[str, Any]) -> P:
    """Validate `values` (typed, or CLI strings like "0.5") into `params_cls`.

    Raises ConfigError naming the defense, each bad parameter and its valid range.
    """
    try:
        return params_cls.model_validate(dict(values))
    except ValidationError as e:
        problems = [_describe_error(params_cls, err) for err in e.errors()]
        raise ConfigError(f"defense {defense!r}: " + "; ".join(problems)) from None


def _describe_error(params_cls: type[DefenseParams], err: Any) -> str:
    field = str(err["loc"][0]) if err["loc"] else "?"
    info = params_cls.model_fields.get(field)
    valid = info.description if info is not None and info.description else "see the docs"
    if err["type"] == "extra_forbidden":
        names = ", ".join(params_cls.model_fields) or "(none)"
        return f"unknown parameter {field!r}; valid parameters: {names}"
    if err["type"] == "missing":
        return f"parameter {field!r} is required: {valid}"
    return f"{field}={err.get('input')!r} is invalid ({err['msg']}); valid: {valid}"


@dataclass(frozen=True)
class Budget:
    """The utility guarantee of a defense: DISTANCES[dist](y, ỹ) <= epsilon for every row."""

    dist: str
    epsilon: float


class Defense(ABC):
    """Maps the model's probabilities to the probabilities the black box returns."""

    Params: ClassVar[type[DefenseParams]] = NoParams
    preserves_argmax: ClassVar[bool] = False
    # Whether the answer depends on the query images x, not only on probs (MAD's Jacobian,
    # keyed noise, an OOD score). Output-only defenses (False) can run where no image is seen,
    # as ART postprocessors (stealguard.interop.art).
    reads_input: ClassVar[bool] = True
    budget: Budget | None = None

    @classmethod
    def from_params(cls, params: DefenseParams, *, victim: torch.nn.Module | None = None,
                    key: bytes | None = None, **components: Any) -> Defense:
        """Build from validated params; `victim`, `key` and components are for defenses
        that need them (MAD's surrogate shape, keyed randomness, trained models)."""
        return cls(**dict(params))

    @abstractmethod
    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, K) -> (B, K)."""


def check_probs(probs: torch.Tensor, *, atol: float = 1e-3) -> None:
    """Refuse anything but a (B, K) batch of finite probability rows summing to 1."""
    expected = "probs must be a float tensor (B, K) of probabilities in [0, 1] summing to 1"
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise InputError(f"{expected}, got {got}")
    if probs.numel() == 0:
        return
    if not torch.isfinite(probs).all():
        raise InputError(f"{expected}; got NaN or infinite values")
    lo, hi = probs.min().item(), probs.max().item()
    if lo < -atol or hi > 1 + atol:
        raise InputError(f"{expected}; got values in [{lo:.4g}, {hi:.4g}]")
    sums = probs.sum(1, dtype=torch.float64)
    if ((sums - 1).abs() > atol).any():
        raise InputError(f"{expected} (within {atol}); got row sums in "
                         f"[{sums.min().item():.4g}, {sums.max().item():.4g}]")


def check_batch(x: torch.Tensor, probs: torch.Tensor) -> None:
    """Check probs, and that x is a finite batch with as many rows."""
    check_probs(probs)
    if not isinstance(x, torch.Tensor) or x.shape[:1] != probs.shape[:1]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x must be a tensor (B, C, H, W) with B = {probs.shape[0]} rows "
                         f"like probs, got {got}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise InputError("x contains NaN or infinite values; expected images in [0, 1]")


class CheckedDefense(Defense):
    """A defense whose final `__call__` checks its input; subclasses implement `perturb`."""

    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        check_batch(x, probs)
        if probs.shape[0] == 0:
            return probs
        return self.perturb(x, probs)

    @abstractmethod
    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Checked (B, C, H, W), (B, K) -> (B, K) rows on the simplex."""


class NoDefense(CheckedDefense):
    """Returns the model's probabilities unchanged."""

    preserves_argmax = True
    reads_input = False
    budget = Budget("l1", 0.0)

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs


class Compose(Defense):
    """Apply defenses in order: the output of one is the input probabilities of the next."""

    def __init__(self, defenses: Sequence[Defense]) -> None:
        self.defenses = list(defenses)
        self.reads_input = any(d.reads_input for d in self.defenses)  # type: ignore[misc]

    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        for d in self.defenses:
            probs = d(x, probs)
        return probs


DefenseFactory = Callable[..., Defense]
DEFENSES: Registry[DefenseFactory] = Registry("defense")
DEFENSES.register("none")(NoDefense)
