"""`stealguard.onnx`: a model exported to ONNX, answered by onnxruntime.

    stealguard import --onnx model.onnx --num-classes 10 --dataset mnist --out artifacts/onnx

An artifact directory:
    manifest.json   format "stealguard.onnx", input shape, classes, normalisation (applied
                    before the graph; none when the graph normalises itself), what the graph
                    outputs (logits or probs), dataset, the graph's sha256
    model.onnx      the graph, copied

It gives probabilities only. What works: the black box, every output defense (MAD with its
own surrogate: a random registered architecture, `surrogate_arch=` or conv3 by default),
every attack, the service (also on Ray, as one member). What is refused, and why:
- MAD on the victim's own features (`surrogate_features=victim`): onnxruntime exposes
  neither the penultimate features nor the last layer;
- an EDM ensemble of ONNX members: EDM trains its members jointly (eq. 3), and onnxruntime
  has no gradients to train them with.

The graph must take one float input of shape (N, C, H, W) with fixed C, H, W (N may be
dynamic; a graph exported with N = 1 is run one image at a time) and give (N, K).
Needs the `onnx` extra: pip install stealguard[onnx].
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from stealguard import __version__
from stealguard.artifacts import WeightsInfo, _atomic_write_bytes, sha256_file
from stealguard.errors import ArtifactError, ConfigError
from stealguard.formats.base import (
    MANIFEST,
    ArtifactFormat,
    ArtifactInfo,
    read_json_manifest,
    register_format,
    shape3,
)
from stealguard.models import Normalize
from stealguard.victim import Victim

FORMAT = "stealguard.onnx"
FORMAT_VERSION = 1
GRAPH = "model.onnx"
INSTALL_HINT = "pip install stealguard[onnx]"
NO_HEAD = ("an ONNX model runs in onnxruntime, which exposes neither its features nor its "
           "last layer")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"ONNX models need onnxruntime, which is not installed ({e}); "
                          f"install it with `{INSTALL_HINT}`") from None
    return onnxruntime


def open_session(path: Path) -> Any:
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConfigError(f"{path} cannot be opened by onnxruntime: {e}") from None


def graph_input(session: Any, path: Path) -> tuple[str, int | None, tuple[int, int, int]]:
    """(input name, fixed batch size or None, (C, H, W)); refuses what we cannot feed."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"{path} takes {len(inputs)} inputs; stealguard feeds one image "
                          f"batch (N, C, H, W): export the model with a single input")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ConfigError(f"{path}: input {inp.name!r} is {inp.type}; export it taking float32 "
                          f"images")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ConfigError(f"{path}: input {inp.name!r} has shape {shape}; expected 4 dims "
                          f"(N, C, H, W)")
    chw = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in chw):
        raise ConfigError(f"{path}: input {inp.name!r} has dynamic or unknown dims {shape}; "
                          f"only the batch dim may be dynamic: export with fixed (C, H, W)")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if batch is not None and batch != 1:
        raise ConfigError(f"{path}: input {inp.name!r} has a fixed batch of {batch}; export "
                          f"with a dynamic batch dim (dynamic_axes / dynamic_shapes) or batch 1")
    return inp.name, batch, (int(chw[0]), int(chw[1]), int(chw[2]))


class OnnxModel(nn.Module):
    """An ONNX graph as a model: pixels in [0, 1] (B, C, H, W) -> logits (B, K), no gradients.

    With outputs="probs" the graph's probabilities are renormalised and `forward` returns
    their logarithm (so softmax(forward(x)) = predict_proba(x))."""

    arch: str | None = None
    no_head_reason = NO_HEAD

    def __init__(self, path: Path, *, num_classes: int, classes: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 outputs: Literal["logits", "probs"] = "logits") -> None:
        super().__init__()
        self.path = Path(path)
        self.session = open_session(self.path)
        self.input_name, self.fixed_batch, self.input_shape = graph_input(self.session,
                                                                          self.path)
        c = self.input_shape[0]
        self.in_channels, self.image_size = c, self.input_shape[1]
        self.num_classes, self.classes, self.outputs = int(num_classes), list(classes), outputs
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.normalize = Normalize(self.mean or [0.0] * c, self.std or [1.0] * c)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        xin = self.normalize(x) if self.mean is not None else x
        arr = np.ascontiguousarray(xin.detach().cpu().numpy().astype(np.float32))
        rows = [arr] if self.fixed_batch is None else [arr[i:i + 1] for i in range(len(arr))]
        outs = [self.session.run(None, {self.input_name: r})[0] for r in rows if len(r)]
        if not outs:
            return torch.zeros(0, self.num_classes)
        return torch.from_numpy(np.concatenate(outs)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x).to(x.device)  # (B, K)
        if self.outputs == "probs":
            return out.clamp_min(1e-12).log()
        return out

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x).to(x.device)
        if self.outputs == "probs":
            out = out.clamp_min(0)
            return out / out.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(out, dim=1)

    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name}, input_shape={self.input_shape}, " \
               f"num_classes={self.num_classes})"


def probe(model: OnnxModel) -> None:
    c, h, w = model.input_shape
    x = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    try:
        out = model._run(x)
    except Exception as e:
        raise ConfigError(f"{model.path}: onnxruntime fails on (2, {c}, {h}, {w}) images: "
                          f"{e}") from None
    if tuple(out.shape) != (2, model.num_classes):
        raise ConfigError(f"{model.path} maps (2, {c}, {h}, {w}) images to output of shape "
                          f"{tuple(out.shape)}; expected (2, {model.num_classes}): num_classes "
                          f"must be the size of its output")
    if not torch.isfinite(out).all():
        raise ConfigError(f"{model.path} gives NaN or infinite outputs on random images")


class OnnxManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    normalization: dict[str, list[float]] | None
    outputs: Literal["logits", "probs"] = "logits"
    metrics: dict[str, Any] = {}
    stealguard_version: str = __version__
    created: str = ""
    graph: WeightsInfo


def import_onnx(
    out: str | Path, *, onnx_path: str | Path, num_classes: int, dataset: str,
    input_shape: Sequence[int] | None = None, classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    outputs: Literal["logits", "probs"] = "logits",
) -> Path:
    """`stealguard import --onnx`: check the graph (input, output, a probe run), then copy it
    with a manifest to `out`."""
    src = Path(onnx_path)
    if not src.is_file():
        raise ConfigError(f"ONNX file {src} does not exist")
    if (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std (one value per channel), or neither")
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for {num_classes} classes")
    model = OnnxModel(src, num_classes=num_classes, classes=names, mean=mean, std=std,
                      outputs=outputs)
    if input_shape is not None and tuple(input_shape) != model.input_shape:
        raise ConfigError(f"{src} takes images of shape {model.input_shape}, not "
                          f"{tuple(input_shape)}: drop --input-shape or export the graph for "
                          f"that shape")
    for name, v in (("mean", model.mean), ("std", model.std)):
        if v is not None and len(v) != model.input_shape[0]:
            raise ConfigError(f"--{name} has {len(v)} values; the input has "
                              f"{model.input_shape[0]} channels")
    probe(model)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(dest / GRAPH, lambda tmp: shutil.copyfile(src, tmp))
    _write_manifest(dest, model, dataset=dataset, metrics={})
    return dest


def _write_manifest(dest: Path, model: OnnxModel, *, dataset: str,
                    metrics: dict[str, Any]) -> None:
    g = dest / GRAPH
    norm = None if model.mean is None else {"mean": model.mean, "std": model.std or []}
    manifest = OnnxManifest(
        dataset=dataset, input_shape=model.input_shape, num_classes=model.num_classes,
        classes=model.classes, normalization=norm, outputs=model.outputs, metrics=metrics,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        graph=WeightsInfo(file=GRAPH, sha256=sha256_file(g), bytes=g.stat().st_size))
    text = json.dumps(manifest.model_dump(), indent=2)
    _atomic_write_bytes(dest / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def read_onnx_manifest(path: Path) -> OnnxManifest:
    return read_json_manifest(path, OnnxManifest, FORMAT)  # type: ignore[no-any-return]


@register_format
class OnnxFormat(ArtifactFormat):
    name = FORMAT
    description = "an ONNX graph answered by onnxruntime (stealguard import --onnx)"

    def handles(self, model: Any) -> bool:
        return isinstance(model, OnnxModel)

    def save(self, victim: Victim, path: Path, *, metrics: dict[str, Any]) -> Path:
        model: OnnxModel = victim.model
        path.mkdir(parents=True, exist_ok=True)
        if (path / GRAPH).resolve() != model.path.resolve():
            _atomic_write_bytes(path / GRAPH, lambda tmp: shutil.copyfile(model.path, tmp))
        _write_manifest(path, model, dataset=victim.dataset, metrics=metrics)
        return path

    def load(self, path: Path) -> Victim:
        m = read_onnx_manifest(path)
        g = path / m.graph.file
        if not g.is_file():
            raise ArtifactError(f"{path}: the graph {m.graph.file} is missing; re-import it")
        if g.stat().st_size != m.graph.bytes or sha256_file(g) != m.graph.sha256:
            raise ArtifactError(f"{g} does not match the manifest's size or sha256: corrupt or "
                                f"altered; re-import it")
        norm = m.normalization or {}
        try:
            model = OnnxModel(g, num_classes=m.num_classes, classes=m.classes,
                              mean=norm.get("mean"), std=norm.get("std"), outputs=m.outputs)
        except ConfigError as e:
            raise ArtifactError(f"{path}: {e}") from None
        if model.input_shape != tuple(m.input_shape):
            raise ArtifactError(f"{path}: the graph takes {model.input_shape}, the manifest says "
                                f"{tuple(m.input_shape)}")
        return Victim(model.eval(), m.dataset, m.classes,
                      float(m.metrics.get("test_accuracy", float("nan"))), {})

    def describe(self, path: Path) -> ArtifactInfo:
        m = read_onnx_manifest(path)
        return ArtifactInfo(self.name, None, shape3(m.input_shape), m.num_classes,
                            list(m.classes), m.normalization, 1, m.dataset,
                            {"outputs": m.outputs})
