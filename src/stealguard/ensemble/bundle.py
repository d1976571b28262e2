"""One EDM bundle on disk: members, hash network, hash parameters, manifest. Never pickle.

    manifest.json            public: format "stealguard.edm", architecture, dataset, shapes,
                             classes, normalisation, N, lambda_D, OOD set, metrics, and the
                             size and sha256 of every other file
    member-0.safetensors     member state dicts, one file per member
    ...
    member-{N-1}.safetensors
    hash.json                secret: the hash (kind, M, m, f_H's architecture and task)
    hash.safetensors         secret: the hash network f_H (DNN hash only)

The hash network and its task are the defender's secret, so they live outside the manifest:
a tool that prints manifest.json shows nothing of them, and `public_info` (what the CLI's
info and a service's info endpoint show) is built from an allow-list besides.

Loading checks the manifest, then every file (present, size, sha256, safetensors, tensor
names and shapes against the architecture) before building anything: a bundle with a
missing or altered member is refused with an ArtifactError that names the file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import save_file

from stealguard import __version__
from stealguard.artifacts import WeightsInfo, _atomic_write_bytes, _load_weights, sha256_file
from stealguard.ensemble import hash_net as _hash_net  # noqa: F401  (registers hash_cnn3)
from stealguard.ensemble.hashing import HASHES, DNNHash
from stealguard.ensemble.predictor import EDMPredictor
from stealguard.errors import ArtifactError, ConfigError
from stealguard.models import Classifier, build_model

MANIFEST = "manifest.json"
HASH_SPEC = "hash.json"
FORMAT = "stealguard.edm"
FORMAT_VERSION = 1
PUBLIC_KEYS = ("format", "format_version", "arch", "dataset", "input_shape", "num_classes",
               "classes", "normalization", "members", "lambda_d", "ood", "metrics",
               "stealguard_version", "created")


class NetSpec(BaseModel):
    """How to rebuild one classifier from its weights file."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization: dict[str, list[float]]
    weights: WeightsInfo


class HashSpec(BaseModel):
    """The contents of hash.json (secret)."""

    model_config = ConfigDict(extra="forbid")

    kind: str  # "dnn", "dct" or "sha1"
    num_classes: int | None = None  # M (DNN hash)
    subclasses: int | None = None  # m (DNN hash)
    task: str = ""  # what f_H was trained on (secret)
    net: NetSpec | None = None  # f_H (DNN hash)
    metrics: dict[str, Any] = {}


class EDMManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    arch: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    normalization: dict[str, list[float]]  # the members' (as a classifier artifact shows)
    members: list[NetSpec]
    lambda_d: float
    ood: str
    train_config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    stealguard_version: str = __version__
    created: str = ""
    hash_spec: WeightsInfo  # hash.json: only its size and sha256, for the integrity check


def _write_net(out: Path, name: str, model: Classifier) -> NetSpec:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = out / name
    _atomic_write_bytes(path, lambda tmp: save_file(state, tmp))
    return NetSpec(arch=model.arch, input_shape=model.input_shape, num_classes=model.num_classes,
                   normalization={"mean": state["normalize.mean"].flatten().tolist(),
                                  "std": state["normalize.std"].flatten().tolist()},
                   weights=WeightsInfo(file=name, sha256=sha256_file(path),
                                       bytes=path.stat().st_size))


def save_edm(
    path: str | Path, edm: EDMPredictor, *, dataset: str, classes: list[str], lambda_d: float,
    ood: str, hash_task: str = "", train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None, hash_metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `edm` as a bundle directory at `path` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    members = [_write_net(out, f"member-{i}.safetensors", cast(Classifier, m))
               for i, m in enumerate(edm.members)]
    h = edm.hash_fn
    if h is None:
        raise ConfigError("an EDM bundle needs the ensemble's hash (hash_fn is None)")
    spec = HashSpec(kind=h.kind, task=hash_task, metrics=hash_metrics or {})
    if isinstance(h, DNNHash):
        spec.num_classes, spec.subclasses = h.num_classes, h.subclasses
        spec.net = _write_net(out, "hash.safetensors", h.net)  # type: ignore[arg-type]
    spec_path = out / HASH_SPEC
    spec_text = json.dumps(spec.model_dump(), indent=2)
    _atomic_write_bytes(spec_path, lambda tmp: Path(tmp).write_text(spec_text))
    manifest = EDMManifest(
        arch=edm.arch, dataset=dataset, input_shape=edm.input_shape,
        num_classes=edm.num_classes, classes=list(classes),
        normalization=members[0].normalization, members=members, lambda_d=float(lambda_d),
        ood=ood, train_config=train_config or {}, metrics=metrics or {},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hash_spec=WeightsInfo(file=HASH_SPEC, sha256=sha256_file(spec_path),
                         bytes=spec_path.stat().st_size),
    )
    text = json.dumps(manifest.model_dump(), indent=2)
    _atomic_write_bytes(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return out


def read_edm_manifest(path: str | Path) -> EDMManifest:
    """Parse and validate a bundle's manifest (no weights are read)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no EDM bundle at {Path(path)}: {mpath} is missing")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the bundle is corrupt") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ArtifactError(f"{mpath}: format {found!r} is not an EDM bundle ({FORMAT})")
    try:
        manifest = EDMManifest.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{mpath} is not a valid EDM manifest: {e}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: EDM bundle v{manifest.format_version} is newer than "
                            f"this stealguard reads (v<={FORMAT_VERSION})")
    if len(manifest.members) < 2:
        raise ArtifactError(f"{mpath} lists {len(manifest.members)} members; EDM needs N >= 2")
    return manifest


def read_hash_spec(path: str | Path, manifest: EDMManifest) -> HashSpec:
    """The secret hash description (hash.json), checked against the manifest's sha256."""
    path = Path(path)
    info = manifest.hash_spec
    hpath = path / info.file
    if not hpath.is_file():
        raise ArtifactError(f"{path}: the hash description ({info.file}) is missing; the "
                            f"bundle is incomplete, re-save it")
    if hpath.stat().st_size != info.bytes or sha256_file(hpath) != info.sha256:
        raise ArtifactError(f"{hpath} does not match the manifest's size or sha256: corrupt or "
                            f"altered; re-save the bundle")
    try:
        return HashSpec.model_validate(json.loads(hpath.read_text()))
    except (ValueError, ValidationError):  # no details: they would print the secret
        raise ArtifactError(f"{hpath} is not a valid hash description") from None


def is_edm_bundle(path: str | Path) -> bool:
    """True when `path` holds a manifest whose format is an EDM bundle."""
    try:
        raw = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def public_info(manifest: EDMManifest) -> dict[str, Any]:
    """What may be shown to anyone: an allow-list, never the secret hash section."""
    full = manifest.model_dump()
    info = {k: full[k] for k in PUBLIC_KEYS}
    info["members"] = len(manifest.members)
    info["defense"] = "edm"
    return info


def _load_net(path: Path, spec: NetSpec, what: str) -> Classifier:
    if not (path / spec.weights.file).is_file():
        raise ArtifactError(f"{path}: {what} ({spec.weights.file}) is missing; the bundle is "
                            f"incomplete, re-save it")
    c, h, _ = spec.input_shape
    try:
        model = build_model(spec.arch, in_channels=c, image_size=h, num_classes=spec.num_classes,
                            mean=spec.normalization["mean"], std=spec.normalization["std"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot build {what} ({spec.arch!r}): {e}") from None
    state = _load_weights(path, spec.weights)  # size, sha256 and safetensors checks
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        raise ArtifactError(f"{path}: {what} ({spec.weights.file}) does not match architecture "
                            f"{spec.arch!r} (tensor names or shapes differ)")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_hash(path: Path, spec: HashSpec):  # type: ignore[no-untyped-def]
    if spec.kind != "dnn":
        return HASHES.get(spec.kind)()
    if spec.net is None or spec.subclasses is None:
        raise ArtifactError(f"{path}: the DNN hash has no network or no sub-class count")
    net = _load_net(path, spec.net, "the hash network")
    try:
        return DNNHash(net, num_classes=spec.num_classes, subclasses=spec.subclasses)
    except ConfigError as e:
        raise ArtifactError(f"{path}: inconsistent hash parameters: {e}") from None


def _load_member(path: Path, manifest: EDMManifest, index: int) -> Classifier:
    n = len(manifest.members)
    if not 0 <= index < n:
        raise ConfigError(f"{path} has {n} members; no member {index}")
    spec = manifest.members[index]
    if (spec.arch, tuple(spec.input_shape), spec.num_classes) != (
            manifest.arch, tuple(manifest.input_shape), manifest.num_classes):
        raise ArtifactError(f"{path}: member {index} of {n} does not match the bundle's "
                            f"architecture, input shape or classes")
    return _load_net(path, spec, f"member {index} of {n}")


def load_member(path: str | Path, index: int) -> Classifier:
    """Member `index` of the bundle alone, checked (a Ray member replica loads only its own)."""
    path = Path(path)
    return _load_member(path, read_edm_manifest(path), index)


def load_selector(path: str | Path) -> Any:
    """The bundle's secret member selector (an ImageHash), checked against the members."""
    path = Path(path)
    manifest = read_edm_manifest(path)
    hash_fn = _load_hash(path, read_hash_spec(path, manifest))
    if isinstance(hash_fn, DNNHash) and hash_fn.input_shape != tuple(manifest.input_shape):
        raise ArtifactError(f"{path}: the hash network takes {hash_fn.input_shape} images, the "
                            f"members take {tuple(manifest.input_shape)}")
    return hash_fn


def load_edm(path: str | Path) -> tuple[EDMPredictor, EDMManifest]:
    """Load a bundle; every file is checked before the predictor is built. Eval mode."""
    path = Path(path)
    manifest = read_edm_manifest(path)
    members = [_load_member(path, manifest, i) for i in range(len(manifest.members))]
    hash_fn = _load_hash(path, read_hash_spec(path, manifest))
    try:
        edm = EDMPredictor(members, hash_fn=hash_fn)
    except ConfigError as e:
        raise ArtifactError(f"{path}: {e}") from None
    return edm, manifest

