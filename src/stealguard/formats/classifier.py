"""`stealguard.classifier`: one registered architecture, safetensors + manifest (artifacts.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stealguard.artifacts import FORMAT, load_classifier, read_manifest, save_classifier
from stealguard.formats.base import ArtifactFormat, ArtifactInfo, register_format, shape3
from stealguard.models import Classifier, build_model
from stealguard.victim import Victim


@register_format
class ClassifierFormat(ArtifactFormat):
    name = FORMAT
    description = "one model of a registered architecture (stealguard train)"

    def handles(self, model: Any) -> bool:
        return isinstance(model, Classifier)

    def save(self, victim: Victim, path: Path, *, metrics: dict[str, Any]) -> Path:
        return save_classifier(path, victim.model, dataset=victim.dataset,
                               classes=victim.classes, train_config=victim.train_config,
                               metrics=metrics)

    def load(self, path: Path) -> Victim:
        model, m = load_classifier(path)
        return Victim(model, m.dataset, m.classes,
                      float(m.metrics.get("test_accuracy", float("nan"))), m.train_config)

    def describe(self, path: Path) -> ArtifactInfo:
        m = read_manifest(path)
        return ArtifactInfo(self.name, m.arch, shape3(m.input_shape), int(m.num_classes),
                            list(m.classes), dict(m.normalization), 1, m.dataset)

    def standin(self, path: Path) -> Any:
        """A fresh model of the manifest's architecture, shape and normalisation (no weights
        read), built without touching the caller's random stream."""
        info = self.describe(path)
        return fresh_model(info)


def fresh_model(info: ArtifactInfo) -> Classifier:
    """An untrained model of a registered architecture shaped like `info`."""
    assert info.arch is not None and info.normalization is not None
    c, h, _ = info.input_shape
    with torch.random.fork_rng(devices=[]):
        return build_model(info.arch, in_channels=c, image_size=h, num_classes=info.num_classes,
                           mean=info.normalization["mean"], std=info.normalization["std"]).eval()
