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

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stealguard.artifacts import FORMAT as CLASSIFIER_FORMAT
from stealguard.artifacts import MANIFEST, load_classifier
from stealguard.blackbox import predict_proba
from stealguard.errors import ArtifactError, ConfigError
from stealguard.registry import Registry


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
        return cls(model, tuple(model.input_shape), int(model.num_classes), list(classes or []))

    @torch.no_grad()  # not inference_mode: a defense after it (MAD) may need autograd
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, K) probabilities (float32, CPU)."""
        return predict_proba(self.model, x).float()


ServedLoader = Callable[[Path], ServedModel]
SERVED_FORMATS: Registry[ServedLoader] = Registry("artifact format")


def read_format(path: str | Path) -> str:
    """The `format` field of the artifact's manifest.json (ArtifactError when unreadable)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no artifact at {Path(path)}: {mpath} is missing")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, str):
        raise ArtifactError(f"{mpath} has no string `format` field")
    return fmt


def load_served_model(path: str | Path) -> ServedModel:
    """Load the artifact at `path` with the loader registered for its manifest's format."""
    fmt = read_format(path)
    if fmt not in SERVED_FORMATS:
        raise ArtifactError(f"{Path(path)}: artifact format {fmt!r} cannot be served; "
                            f"servable formats: {', '.join(SERVED_FORMATS.names())}")
    return SERVED_FORMATS.get(fmt)(Path(path))


@SERVED_FORMATS.register(CLASSIFIER_FORMAT)
def _load_classifier(path: Path) -> ServedModel:
    model, manifest = load_classifier(path)
    return ServedModel(model, manifest.input_shape, manifest.num_classes, manifest.classes,
                       manifest.format)


@SERVED_FORMATS.register("stealguard.edm")
def _load_edm(path: Path) -> ServedModel:
    from stealguard.ensemble import load_edm  # imported when an EDM bundle is served

    edm, manifest = load_edm(path)
    return ServedModel(edm, manifest.input_shape, manifest.num_classes, manifest.classes,
                       manifest.format)
