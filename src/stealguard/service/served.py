"""What the service serves: a model with a shape, a class list and `predict_proba`.

Any object with `input_shape` (C, H, W), `num_classes` and either `predict_proba(x)` (an EDM
ensemble routes each image to one member) or `forward(x) -> logits` (a plain classifier) can
be served. Artifacts on disk are loaded by the loader registered for their manifest's
`format`, so a new kind of artifact plugs in with one decorator:

    @SERVED_FORMATS.register("stealguard.edm")
    def _load_edm(path: Path) -> ServedModel: ...

    served = load_served_model("artifacts/mnist-edm")   # dispatches on manifest.json "format"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stealguard.errors import ConfigError
from stealguard.formats import FORMATS, format_of, read_format
from stealguard.victim import predict_proba

SERVED_FORMATS = FORMATS  # every artifact format can be served
__all__ = ["SERVED_FORMATS", "ServedModel", "load_served_model", "read_format"]


@dataclass
class ServedModel:
    """A model behind the service. `model` is an nn.Module or any object with predict_proba."""

    model: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str] = field(default_factory=list)
    format: str = "in-memory"

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)  # type: ignore[assignment]
        if len(self.input_shape) != 3:
            raise ConfigError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if not self.classes:
            self.classes = [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ConfigError(f"{len(self.classes)} class names for {self.num_classes} classes")
        if isinstance(self.model, nn.Module):
            self.model.eval()

    @classmethod
    def wrap(cls, model: Any, *, classes: list[str] | None = None) -> ServedModel:
        """A ServedModel as is, or one around a model object with input_shape/num_classes."""
        if isinstance(model, ServedModel):
            return model
        for attr in ("input_shape", "num_classes"):
            if not hasattr(model, attr):
                raise ConfigError(f"a served model needs `{attr}`; {type(model).__name__} "
                                  f"has none")
        if not (callable(getattr(model, "predict_proba", None)) or callable(model)):
            raise ConfigError(f"a served model needs predict_proba(x) or forward(x); "
                              f"{type(model).__name__} has neither")
        names = classes or getattr(model, "classes", None) or []  # a wrapped model has its own
        return cls(model, tuple(model.input_shape), int(model.num_classes), list(names))

    @torch.no_grad()  # not inference_mode: a defense after it (MAD) may need autograd
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, K) probabilities (float32, CPU)."""
        return predict_proba(self.model, x).float()


def load_served_model(path: str | Path) -> ServedModel:
    """Load the artifact at `path` with the format its manifest names."""
    fmt = format_of(path)
    victim = fmt.load(Path(path))
    model = victim.model
    return ServedModel(model, tuple(model.input_shape), int(model.num_classes),
                       list(victim.classes), fmt.name)
