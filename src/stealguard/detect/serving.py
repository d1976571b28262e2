"""`serve --detector ...`: the detectors of a served artifact, built before serving starts.

Names and parameters are checked here, so a typo fails at start with the valid ones listed.
The shift detector's held-out images are `shift.reference=<dataset>@<split>` (default: the
artifact's dataset, test split), shaped as the model's input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stealguard.detect.monitor import Monitor, build_monitor, parse_detector_args
from stealguard.errors import ConfigError, StealguardError


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"{what} {item!r}: expected name=value")
        out[k] = v
    return out


def load_reference(spec: str, input_shape: tuple[int, int, int], *,
                   data_root: str | Path | None = None) -> torch.Tensor:
    """`dataset@split` -> uint8 images (N, C, H, W) shaped as the model's input."""
    from stealguard.data import load_dataset
    from stealguard.data.augment import to_shape

    name, _, split = spec.partition("@")
    ds = load_dataset(name, split or "test", data_root=data_root)
    c, h, _ = input_shape
    images = ds.images
    if tuple(images.shape[1:]) != tuple(input_shape):
        images = to_shape(images, c, h)
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def serving_monitor(artifact: Path, served: Any, names: Sequence[str], params: Sequence[str],
                    *, policy: str, policy_params: Sequence[str], store: Any,
                    device: str, data_root: str | None) -> Monitor:
    specs = parse_detector_args(names, params)
    reference = None
    for name, p in specs:
        if name == "shift":
            ref = p.pop("reference", None) or _artifact_dataset(artifact)
            if ref is None:
                raise ConfigError("detector 'shift' needs held-out images: "
                                  "--detector-param shift.reference=<dataset>@<split>")
            try:
                reference = load_reference(ref, served.input_shape, data_root=data_root)
            except StealguardError as e:
                raise ConfigError(f"detector 'shift' needs held-out images; {ref!r}: {e}; "
                                  "give --detector-param shift.reference=<dataset>@<split>"
                                  ) from None
    return build_monitor(specs, model=served.model, policy=policy,
                         policy_params=parse_pairs(policy_params, "--detect-policy-param"),
                         reference=reference, store=store, device=device)


def _artifact_dataset(artifact: Path) -> str | None:
    try:
        dataset = json.loads((Path(artifact) / "manifest.json").read_text()).get("dataset")
    except (OSError, ValueError):
        return None
    return f"{dataset}@test" if isinstance(dataset, str) and dataset else None
