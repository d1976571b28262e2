"""`stealguard demo`: the main job, end to end on real data.

Train an MNIST `conv3` victim, steal it with KnockoffNets using FashionMNIST queries (soft
and hard labels), and print one table. Two scales:

    quick  a fresh 2-core CPU in a few minutes: a 20,000-image victim, 10,000 queries
    full   the papers' sizes (EDM section 5.1): full MNIST victim, 50,000 queries, clones
           trained 50 epochs with SGD lr 0.1 and cosine annealing; meant for a GPU
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stealguard.pipeline import steal_knockoff, train_victim
from stealguard.training import TrainConfig


@dataclass(frozen=True)
class DemoScale:
    victim_subset: int | None
    victim_config: TrainConfig
    budget: int
    clone_config: TrainConfig


SCALES: dict[str, DemoScale] = {
    "quick": DemoScale(
        victim_subset=20_000,
        victim_config=TrainConfig(epochs=3, batch_size=128, optimizer="sgd", lr=0.05),
        budget=10_000,
        clone_config=TrainConfig(epochs=8, batch_size=128, optimizer="sgd", lr=0.05),
    ),
    "full": DemoScale(
        victim_subset=None,
        victim_config=TrainConfig(epochs=20, batch_size=128, optimizer="sgd", lr=0.05),
        budget=50_000,
        clone_config=TrainConfig(epochs=50, batch_size=128, optimizer="sgd", lr=0.1),
    ),
}


def run_demo(
    *, scale: str = "quick", device: str | torch.device | None = "cpu",
    data_root: str | Path | None = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows of the demo table: the victim, then one KnockoffNets row per label type."""
    s = SCALES[scale]
    victim = train_victim("mnist", "conv3", s.victim_config, data_root=data_root,
                          train_subset=s.victim_subset, device=device, progress=progress)
    rows: list[dict[str, Any]] = [{
        "row": "victim", "dataset": "mnist", "arch": "conv3", "defense": "none",
        "attack": "-", "labels": "-", "queries": 0, "accuracy": victim.test_accuracy,
        "normalized_accuracy": 1.0, "agreement": 1.0,
    }]
    for labels in ("soft", "hard"):
        r = steal_knockoff(victim, surrogate="fashionmnist", budget=s.budget, labels=labels,
                           config=s.clone_config, data_root=data_root, device=device,
                           progress=progress)
        rows.append({
            "row": "clone", "dataset": "mnist", "arch": "conv3", "defense": "none",
            "attack": "knockoff(fashionmnist)", "labels": labels, "queries": r["queries"],
            "accuracy": r["clone_accuracy"], "normalized_accuracy": r["normalized_accuracy"],
            "agreement": r["agreement"],
        })
    return rows
