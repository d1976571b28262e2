"""`stealguard.edm`: an EDM bundle (members + secret hash, ensemble/bundle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from stealguard.ensemble.bundle import (
    FORMAT,
    load_member,
    load_selector,
    public_info,
    read_edm_manifest,
    save_edm,
)
from stealguard.ensemble.pipeline import EDMVictim, load_edm_victim
from stealguard.ensemble.predictor import EDMPredictor
from stealguard.formats.base import ArtifactFormat, ArtifactInfo, register_format, shape3
from stealguard.formats.classifier import fresh_model
from stealguard.victim import Victim


@register_format
class EDMFormat(ArtifactFormat):
    name = FORMAT
    description = "an EDM ensemble: N members and a secret hash (stealguard train --defense edm)"

    def handles(self, model: Any) -> bool:
        return isinstance(model, EDMPredictor)

    def save(self, victim: Victim, path: Path, *, metrics: dict[str, Any]) -> Path:
        hash_accuracy = getattr(victim, "hash_accuracy", float("nan"))
        return save_edm(path, victim.model, dataset=victim.dataset, classes=victim.classes,
                        lambda_d=getattr(victim, "lambda_d", 0.0), ood=getattr(victim, "ood", ""),
                        hash_task=getattr(victim, "hash_task", ""),
                        train_config=victim.train_config, metrics=metrics,
                        hash_metrics={"accuracy": hash_accuracy})

    def load(self, path: Path) -> EDMVictim:
        return load_edm_victim(path)

    def describe(self, path: Path) -> ArtifactInfo:
        m = read_edm_manifest(path)
        return ArtifactInfo(self.name, m.arch, shape3(m.input_shape), int(m.num_classes),
                            list(m.classes), dict(m.normalization), len(m.members), m.dataset,
                            public_info(m))

    def load_member(self, path: Path, index: int) -> nn.Module:
        return load_member(path, index)

    def load_selector(self, path: Path) -> Any:
        return load_selector(path)

    def standin(self, path: Path) -> Any:
        return fresh_model(self.describe(path))
