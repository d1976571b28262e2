"""Model artifacts: weights as safetensors plus a JSON manifest. Never pickle.

An artifact is a directory:
    manifest.json       architecture, dataset, input shape, normalisation, classes,
                        training config, metrics, package version, weights sha256
    model.safetensors   the state dict

Loading checks the manifest (schema, known architecture), the weights file (size and
sha256, so a truncated or altered file is caught before parsing), and that the tensors
match the architecture exactly (names and shapes). Nothing is half-loaded: a model is
returned only when every check has passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stealguard import __version__
from stealguard.errors import ArtifactError
from stealguard.models import Classifier, build_model

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "stealguard.classifier"
FORMAT_VERSION = 1


class WeightsInfo(BaseModel):
    file: str
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """What a classifier artifact says about itself."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    arch: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    normalization: dict[str, list[float]]
    train_config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    stealguard_version: str = __version__
    created: str = ""
    weights: WeightsInfo | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_classifier(
    path: str | Path, model: Classifier, *, dataset: str, classes: list[str],
    train_config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as an artifact directory at `path` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    wfile = out / WEIGHTS
    manifest = Manifest(
        arch=model.arch, dataset=dataset, input_shape=model.input_shape,
        num_classes=model.num_classes, classes=list(classes),
        normalization={"mean": model.normalize.mean.flatten().tolist(),
                       "std": model.normalize.std.flatten().tolist()},
        train_config=train_config or {}, metrics=metrics or {},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        weights=WeightsInfo(file=WEIGHTS, sha256=sha256_file(wfile), bytes=wfile.stat().st_size),
        **(extra or {}),
    )
    text = json.dumps(manifest.model_dump(), indent=2)
    _atomic_write_bytes(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return out


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate an artifact's manifest, with errors that say what to do."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no artifact at {Path(path)}: {mpath} is missing "
                            f"(create one with `stealguard train ... --out {Path(path)}`)")
    try:
        raw = json.loads(mpath.read_text())
        manifest = Manifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt") from None
    except ValidationError as e:
        raise ArtifactError(f"{mpath} is not a valid manifest: {e}") from None
    if manifest.format != FORMAT or manifest.format_version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format {manifest.format!r} v{manifest.format_version} is "
                            f"not a {FORMAT} v<={FORMAT_VERSION} artifact")
    if manifest.weights is None:
        raise ArtifactError(f"{mpath} names no weights file")
    return manifest


def _load_weights(path: Path, info: WeightsInfo) -> dict[str, torch.Tensor]:
    wpath = path / info.file
    if not wpath.is_file():
        raise ArtifactError(f"weights file {wpath} is missing")
    size = wpath.stat().st_size
    if size != info.bytes:
        raise ArtifactError(f"weights file {wpath} has {size} bytes, the manifest says "
                            f"{info.bytes}: truncated or replaced; re-save the artifact")
    if sha256_file(wpath) != info.sha256:
        raise ArtifactError(f"weights file {wpath} does not match the manifest's sha256: "
                            f"corrupt or altered; re-save the artifact")
    try:
        return load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"weights file {wpath} cannot be read as safetensors: {e}") from None


def load_classifier(path: str | Path) -> tuple[Classifier, Manifest]:
    """Load a classifier artifact; raises ArtifactError on any mismatch. Returns eval mode."""
    path = Path(path)
    manifest = read_manifest(path)
    assert manifest.weights is not None
    c, h, w = manifest.input_shape
    try:
        model = build_model(
            manifest.arch, in_channels=c, image_size=h, num_classes=manifest.num_classes,
            mean=manifest.normalization["mean"], std=manifest.normalization["std"],
        )
    except (KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot build {manifest.arch!r} from the manifest: {e}") from None
    state = _load_weights(path, manifest.weights)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:5]
        unexpected = sorted(set(found) - set(expected))[:5]
        wrong = [k for k in expected if k in found and expected[k] != found[k]][:5]
        raise ArtifactError(
            f"{path}: tensors do not match architecture {manifest.arch!r}: missing {missing}, "
            f"unexpected {unexpected}, wrong shape {wrong}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), manifest
