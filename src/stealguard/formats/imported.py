"""`stealguard.module`: your own architecture, imported: a factory plus its state_dict.

    stealguard import --factory mypkg.nets:build --weights net.pt --input-shape 1,28,28 \
        --num-classes 10 --dataset mnist --mean 0.1307 --std 0.3081 --out artifacts/mine

An artifact directory:
    manifest.json       format "stealguard.module", the factory ("package.module:function"),
                        input shape, classes, normalisation, last layer, dataset, weights sha256
    model.safetensors   the module's state_dict (converted from .pt/.pth on import: the
                        artifact never holds a pickle)

Loading imports the factory's module and calls the factory with no arguments (that runs its
code: import artifacts only from factories you trust), checks the tensors against the
module's state_dict (names and shapes, missing and unexpected keys listed), loads them and
wraps the module with `stealguard.wrap` (one probe forward pass). The factory's package must
be importable where the artifact is loaded (on PYTHONPATH, or installed).

A .pt/.pth checkpoint is read with `torch.load(weights_only=True)` only: tensors and plain
containers. A checkpoint that needs arbitrary unpickling (a whole pickled module, custom
classes) is refused with the reason; save `model.state_dict()` instead, or use safetensors.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stealguard import __version__
from stealguard.artifacts import WeightsInfo, _atomic_write_bytes, _load_weights, sha256_file
from stealguard.errors import ArtifactError, ConfigError
from stealguard.formats.base import (
    MANIFEST,
    ArtifactFormat,
    ArtifactInfo,
    read_json_manifest,
    register_format,
    shape3,
)
from stealguard.victim import Victim
from stealguard.wrapped import WrappedModel, wrap

FORMAT = "stealguard.module"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


class ModuleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    factory: str  # "package.module:function", called with no arguments
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    normalization: dict[str, list[float]] | None  # applied before the module; None: none
    last_layer: str | None = None
    source: dict[str, Any] = {}  # the imported file's name and sha256
    train_config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    stealguard_version: str = __version__
    created: str = ""
    weights: WeightsInfo


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """"package.module:function" -> the function (ConfigError saying what to fix)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"factory {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {mod_name!r} for factory {spec!r} ({e}); put its "
                          f"package on PYTHONPATH or install it") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)  # type: ignore[assignment]
        if fn is None:
            raise ConfigError(f"{mod_name!r} has no {attr!r} (factory {spec!r})")
    if not callable(fn):
        raise ConfigError(f"factory {spec!r} is not callable")
    return fn  # type: ignore[return-value]


def build_module(spec: str) -> nn.Module:
    """Call the factory; it must return an nn.Module."""
    try:
        module = resolve_factory(spec)()
    except ConfigError:
        raise
    except Exception as e:  # the user's code failed
        raise ConfigError(f"factory {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"factory {spec!r} returned a {type(module).__name__}, not a "
                          f"torch.nn.Module")
    return module


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors, or a .pt/.pth read with weights_only=True only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{path} cannot be read as safetensors: {e}") from None
    if path.suffix not in (".pt", ".pth"):
        raise ConfigError(f"weights {path}: expected a .safetensors, .pt or .pth state_dict")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path} needs arbitrary unpickling to load ({first}); refused: loading it could "
            f"run code. Save the weights alone, torch.save(model.state_dict(), ...), or as "
            f"safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as a torch checkpoint: {e}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a common checkpoint layout: {"state_dict": ..., "epoch": ...}
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state_dict (names -> "
                          f"tensors); save model.state_dict()")
    return dict(obj)


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Refuse tensors that do not match the module's state_dict, listing every difference."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: {found[k]} vs {expected[k]}" for k in expected
             if k in found and expected[k] != found[k]]
    raise ConfigError(f"{what} does not match the factory's module: missing keys {missing}, "
                      f"unexpected keys {unexpected}, wrong shapes {wrong}; save the "
                      f"state_dict of the module the factory builds")


def _normalization(model: WrappedModel) -> dict[str, list[float]] | None:
    if model.mean is None or model.std is None:
        return None
    return {"mean": list(model.mean), "std": list(model.std)}


def save_module_artifact(path: Path, model: WrappedModel, *, factory: str, dataset: str,
                         metrics: dict[str, Any] | None = None,
                         train_config: dict[str, Any] | None = None,
                         source: dict[str, Any] | None = None) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    _atomic_write_bytes(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    wfile = out / WEIGHTS
    manifest = ModuleManifest(
        factory=factory, dataset=dataset, input_shape=model.input_shape,
        num_classes=model.num_classes, classes=list(model.classes),
        normalization=_normalization(model), last_layer=getattr(model, "last_layer", None),
        source=source or {}, train_config=train_config or {}, metrics=metrics or {},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        weights=WeightsInfo(file=WEIGHTS, sha256=sha256_file(wfile), bytes=wfile.stat().st_size))
    text = json.dumps(manifest.model_dump(), indent=2)
    _atomic_write_bytes(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return out


def import_factory(
    out: str | Path, *, factory: str, weights: str | Path, input_shape: Sequence[int],
    num_classes: int, dataset: str, classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    last_layer: str | None = None,
) -> Path:
    """`stealguard import --factory`: check everything, then write the artifact at `out`."""
    module = build_module(factory)
    state = read_state_dict(weights)
    check_keys(module, state, what=f"checkpoint {Path(weights).name}")
    module.load_state_dict(state, strict=True)
    model = wrap(module, input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                 classes=classes, last_layer=last_layer)  # the probe: shapes, last layer
    source = {"file": Path(weights).name, "sha256": sha256_file(Path(weights))}
    return save_module_artifact(Path(out), model, factory=factory, dataset=dataset,
                                source=source)


def read_module_manifest(path: Path) -> ModuleManifest:
    return read_json_manifest(path, ModuleManifest, FORMAT)  # type: ignore[no-any-return]


@register_format
class ModuleFormat(ArtifactFormat):
    name = FORMAT
    description = "your own architecture: a factory and its state_dict (stealguard import)"

    def handles(self, model: Any) -> bool:
        return isinstance(model, WrappedModel) and isinstance(getattr(model, "factory", None),
                                                              str)

    def save(self, victim: Victim, path: Path, *, metrics: dict[str, Any]) -> Path:
        return save_module_artifact(path, victim.model, factory=victim.model.factory,
                                    dataset=victim.dataset, metrics=metrics,
                                    train_config=victim.train_config)

    def load(self, path: Path) -> Victim:
        m = read_module_manifest(path)
        state = _load_weights(path, m.weights)  # size, sha256, safetensors
        try:
            module = build_module(m.factory)
            check_keys(module, state, what=f"{path / m.weights.file}")
            module.load_state_dict(state, strict=True)
            norm = m.normalization or {}
            model = wrap(module, input_shape=m.input_shape, num_classes=m.num_classes,
                         mean=norm.get("mean"), std=norm.get("std"), classes=m.classes,
                         last_layer=m.last_layer)
        except ConfigError as e:
            raise ArtifactError(f"{path}: {e}") from None
        model.factory = m.factory  # type: ignore[assignment]  # so it can be saved again
        return Victim(model, m.dataset, m.classes,
                      float(m.metrics.get("test_accuracy", float("nan"))), m.train_config)

    def describe(self, path: Path) -> ArtifactInfo:
        m = read_module_manifest(path)
        return ArtifactInfo(self.name, None, shape3(m.input_shape), m.num_classes,
                            list(m.classes), m.normalization, 1, m.dataset,
                            {"factory": m.factory, "last_layer": m.last_layer})

    def standin(self, path: Path) -> Any:
        """The factory's module, freshly built (no weights read), wrapped: what MAD copies."""
        m = read_module_manifest(path)
        norm = m.normalization or {}
        with torch.random.fork_rng(devices=[]):
            module = build_module(m.factory)
        return wrap(module, input_shape=m.input_shape, num_classes=m.num_classes,
                    mean=norm.get("mean"), std=norm.get("std"), classes=m.classes,
                    last_layer=m.last_layer)
