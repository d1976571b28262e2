"""The artifact-format registry: every kind of artifact on disk, and the only code that
tells them apart.

An artifact is a directory with a `manifest.json` whose `format` field names the format that
wrote it. Each format is one `ArtifactFormat` registered in FORMATS under that name, and
says how to

    save(victim, path)      write a Victim whose model it `handles`
    load(path)              a Victim (model in eval mode), every file checked first
    describe(path)          public facts from the manifest (no weights read)
    load_member(path, i)    member i alone (a bundle's; a single model is member 0)
    load_selector(path)     a bundle's secret member selector (None: one member)
    standin(path)           a model shaped like the served one, for a defense that reads
                            only its shape (MAD's surrogate, top-k's K)

Everything else (pipeline, the CLI, the service, Ray Serve, reproduction) goes through the
functions at the bottom of this file:

    victim = load_victim("artifacts/mnist-edm")       # whatever format the manifest names
    save_victim(victim, "artifacts/copy")             # the format that handles victim.model
    describe_artifact("artifacts/mnist-edm").members  # 5
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from stealguard.errors import ArtifactError
from stealguard.registry import Registry
from stealguard.victim import Victim

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact's manifest says about it (public; no weights read)."""

    format: str
    arch: str | None  # a registered architecture, or None (imported module, ONNX)
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    normalization: dict[str, list[float]] | None
    members: int  # N for an EDM bundle; 1 for a single model
    dataset: str = ""
    public: dict[str, Any] = field(default_factory=dict)  # the format's own public facts


class ArtifactFormat(ABC):
    """One kind of artifact on disk. Subclasses set `name` (the manifest's `format`)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def handles(self, model: Any) -> bool:
        """True when `save` can write a victim with this model."""

    @abstractmethod
    def save(self, victim: Victim, path: Path, *, metrics: dict[str, Any]) -> Path:
        """Write `victim` at `path` (created if needed)."""

    @abstractmethod
    def load(self, path: Path) -> Victim:
        """Load the artifact at `path`; ArtifactError on any mismatch."""

    @abstractmethod
    def describe(self, path: Path) -> ArtifactInfo:
        """The artifact's public facts, from its manifest."""

    def load_member(self, path: Path, index: int) -> nn.Module:
        """Member `index`: (B, C, H, W) -> (B, K) logits. A single model is member 0."""
        from stealguard.errors import ConfigError

        if index != 0:
            raise ConfigError(f"{path} has 1 member; no member {index}")
        return self.load(path).model

    def load_selector(self, path: Path) -> Any:
        """The secret member selector (an ImageHash) of a bundle; None for one member."""
        return None

    def standin(self, path: Path) -> Any:
        """A model shaped like the served one (default: the model itself)."""
        return self.load(path).model


FORMATS: Registry[ArtifactFormat] = Registry("artifact format")


def read_json_manifest(path: Path, model: Any, fmt: str) -> Any:
    """`path`/manifest.json validated into the pydantic `model`; ArtifactError naming `fmt`."""
    mpath = path / MANIFEST
    try:
        return model.model_validate(json.loads(mpath.read_text()))
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ArtifactError(f"{mpath} is not a valid {fmt} manifest: {e}") from None


def shape3(shape: Any) -> tuple[int, int, int]:
    """A manifest's (C, H, W) as a typed triple."""
    c, h, w = (int(d) for d in shape)
    return (c, h, w)


def register_format(fmt: type[ArtifactFormat]) -> type[ArtifactFormat]:
    """Class decorator: register one instance of `fmt` under `fmt.name`."""
    FORMATS.register(fmt.name)(fmt())
    return fmt


def read_format(path: str | Path) -> str:
    """The `format` field of the artifact's manifest.json (ArtifactError when unreadable)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no artifact at {Path(path)}: {mpath} is missing (create one "
                            f"with `stealguard train ... --out {Path(path)}` or "
                            f"`stealguard import ... --out {Path(path)}`)")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, str):
        raise ArtifactError(f"{mpath} has no string `format` field")
    return fmt


def format_of(path: str | Path) -> ArtifactFormat:
    """The registered format that wrote the artifact at `path`."""
    fmt = read_format(path)
    if fmt not in FORMATS:
        raise ArtifactError(f"{Path(path)}: artifact format {fmt!r} cannot be served; "
                            f"servable formats: {', '.join(FORMATS.names())}")
    return FORMATS.get(fmt)


def format_for(model: Any) -> ArtifactFormat:
    """The registered format that can save `model`."""
    for name in FORMATS:
        if FORMATS.get(name).handles(model):
            return FORMATS.get(name)
    raise ArtifactError(f"no artifact format can save a {type(model).__name__}; formats: "
                        f"{', '.join(FORMATS.names())} (a module brought in with "
                        f"stealguard.wrap is saved by `stealguard import --factory ...`)")


def load_victim(path: str | Path) -> Victim:
    """The artifact at `path`, by the format its manifest names."""
    return format_of(path).load(Path(path))


def save_victim(victim: Victim, path: str | Path, **extra_metrics: Any) -> Path:
    """Write `victim` with the format that handles its model; metrics: its test accuracy and
    `extra_metrics`."""
    return format_for(victim.model).save(
        victim, Path(path), metrics={"test_accuracy": victim.test_accuracy, **extra_metrics})


def describe_artifact(path: str | Path) -> ArtifactInfo:
    return format_of(path).describe(Path(path))


def load_member(path: str | Path, index: int) -> nn.Module:
    return format_of(path).load_member(Path(path), index)


def load_selector(path: str | Path) -> Any:
    return format_of(path).load_selector(Path(path))


def load_standin(path: str | Path) -> Any:
    return format_of(path).standin(Path(path))
