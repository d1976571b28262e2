"""The victim interface, at the bottom of the house: what every other part asks of a model.

A `Predictor` is anything with

    input_shape    (C, H, W) of one image, pixels in [0, 1]
    num_classes    K
    predict_proba  (B, C, H, W) float in [0, 1] -> (B, K) probabilities

Our `Classifier`, an `EDMPredictor`, a module brought in with `stealguard.wrap`, an imported
ONNX model and the Ray router's ensemble are all Predictors; the black box, the service, the
defenses and the attacks take one. A predictor that also has

    forward_features  (B, C, H, W) -> (B, D) penultimate features, and
    classifier        nn.Linear (D -> K), with forward = classifier(forward_features(x))

`HasHead` supports MAD's last-layer form (closed-form Jacobian, `surrogate_features=victim`).

A `Victim` is a predictor with what its owner knows about it: the dataset it was trained on,
the class names, its test accuracy and how it was trained. Artifact formats load and save
Victims (`stealguard.formats`); `pipeline`, `ensemble`, `service` and `reproduce` import it
from here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# The clone architecture an attack trains when the victim's own is not a registered one (a
# module brought in with `wrap`, an ONNX model): small, fast on CPU, any input shape.
DEFAULT_CLONE_ARCH = "conv3"


@runtime_checkable
class Predictor(Protocol):
    """Images in [0, 1] (B, C, H, W) -> probabilities (B, K)."""

    input_shape: tuple[int, int, int]
    num_classes: int

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HasHead(Protocol):
    """A predictor whose last layer is a linear map of its penultimate features."""

    classifier: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


def has_head(model: object) -> bool:
    """True when `model` exposes forward_features(x) and a linear `classifier` (MAD's
    last-layer form can use it)."""
    return callable(getattr(model, "forward_features", None)) and isinstance(
        getattr(model, "classifier", None), nn.Linear)


def predict_proba(model: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K) probabilities. Models with their own `predict_proba` (an EDM
    ensemble routes each image to one member) are asked directly; others return logits."""
    own = getattr(model, "predict_proba", None)
    if callable(own):
        return own(x)
    return torch.softmax(model(x).float(), dim=1)


def registered_arch(model: object) -> str | None:
    """The model's architecture name when it is a registered one (a clone or MAD surrogate
    can then be built like it), else None."""
    from stealguard.models import MODELS  # models is a leaf package; imported on use

    arch = getattr(model, "arch", None)
    return arch if isinstance(arch, str) and arch in MODELS else None


def clone_arch(model: object) -> str:
    """The architecture an attack's clone defaults to: the victim's when registered, else
    DEFAULT_CLONE_ARCH, with a warning that says so and how to choose another."""
    arch = registered_arch(model)
    if arch is not None:
        return arch
    warnings.warn(f"the victim ({describe(model)}) has no registered architecture; the clone "
                  f"defaults to {DEFAULT_CLONE_ARCH!r} (choose one with --arch / "
                  f"options={{'arch': ...}}; see `stealguard models`)", UserWarning,
                  stacklevel=2)
    return DEFAULT_CLONE_ARCH


def describe(model: object) -> str:
    """A short public name for a model: its registered arch, or its class name."""
    arch = getattr(model, "arch", None)
    return arch if isinstance(arch, str) else type(model).__name__


@dataclass
class Victim:
    """A predictor and what its owner knows about it."""

    model: Any  # a Predictor (usually an nn.Module: Classifier, EDMPredictor, WrappedModel)
    dataset: str
    classes: list[str]
    test_accuracy: float
    train_config: dict[str, Any] = field(default_factory=dict)
