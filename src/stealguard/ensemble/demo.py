"""The EDM rows of `stealguard demo`: an EDM MNIST victim, stolen with KnockoffNets.

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, Table 3 (MNIST, KnockoffNets with FashionMNIST queries). Same budget, clone
architecture and clone training as the undefended rows of `stealguard.demo`, so the clone
accuracies compare directly. The EDM: N = 5 `conv3` members, KMNIST halves as the secret
hash task and the OOD set (see `stealguard.ensemble.pipeline`), M = 10, m = 2.

    quick  2-core CPU: members on the same 20,000-image subset and 3 epochs as the
           undefended quick victim, in batches of 32 with 8 KMNIST OOD images per step
           (on a CPU the vmapped step costs least per image at small batches: 2.5 ms per
           image for the five members at 32 + 8, 3.9 ms at 128 + 32)
    full   the paper's sizes, for a GPU: full MNIST, 20 epochs, batches of 128 + 128
           (not yet run: lambda_D and the epochs are carried over from quick, untuned)

lambda_D = 0.5: at quick scale the largest value tried (0.25, 0.5, 1) that kept the EDM's
test accuracy at or above the undefended victim's (98.78 vs 98.65; 1.0 gave 98.43), with a
median coherence of 0.001 on the FashionMNIST queries (BENCHMARKS-edm.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stealguard.ensemble.pipeline import EDMVictim, train_edm
from stealguard.pipeline import steal_knockoff
from stealguard.training import TrainConfig


@dataclass(frozen=True)
class EDMScale:
    members_config: TrainConfig
    lambda_d: float
    ood_batch_size: int
    hash_config: TrainConfig


EDM_SCALES: dict[str, EDMScale] = {
    "quick": EDMScale(
        members_config=TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05),
        lambda_d=0.5, ood_batch_size=8,
        hash_config=TrainConfig(epochs=5, batch_size=128, optimizer="sgd", lr=0.05),
    ),
    "full": EDMScale(
        members_config=TrainConfig(epochs=20, batch_size=128, optimizer="sgd", lr=0.05),
        lambda_d=0.5, ood_batch_size=128,
        hash_config=TrainConfig(epochs=20, batch_size=128, optimizer="sgd", lr=0.05),
    ),
}


def train_demo_edm(
    *, scale: str = "quick", device: str | torch.device | None = "cpu",
    data_root: str | Path | None = None, progress: bool = True,
) -> EDMVictim:
    """The demo's EDM victim: MNIST conv3, N = 5, KMNIST halves for the hash and D_out."""
    from stealguard.demo import SCALES  # the undefended rows' sizes (lazy: demo imports us)

    s, e = SCALES[scale], EDM_SCALES[scale]
    return train_edm("mnist", "conv3", e.members_config, members=5, lambda_d=e.lambda_d,
                     ood="kmnist", hash_task="kmnist", subclasses=2, hash_config=e.hash_config,
                     ood_batch_size=e.ood_batch_size, data_root=data_root,
                     train_subset=s.victim_subset, device=device, progress=progress)


def run_edm_rows(
    scale: str = "quick", device: str | torch.device | None = "cpu",
    data_root: str | Path | None = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows of the demo table for EDM: the victim, then one KnockoffNets row per label type."""
    victim = train_demo_edm(scale=scale, device=device, data_root=data_root, progress=progress)
    return edm_rows(victim, scale=scale, device=device, data_root=data_root, progress=progress)


def edm_rows(
    victim: EDMVictim, *, scale: str = "quick", device: str | torch.device | None = "cpu",
    data_root: str | Path | None = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """The demo rows of a trained EDM victim (KnockoffNets at the demo's budget)."""
    from stealguard.demo import SCALES, clone_row

    s = SCALES[scale]
    rows: list[dict[str, Any]] = [{
        "row": "victim", "dataset": victim.dataset, "arch": victim.model.arch, "defense": "edm",
        "attack": "-", "labels": "-", "queries": 0, "accuracy": victim.test_accuracy,
        "normalized_accuracy": 1.0, "agreement": 1.0,
    }]
    for labels in ("soft", "hard"):
        r = steal_knockoff(victim, surrogate="fashionmnist", budget=s.budget, labels=labels,
                           config=s.clone_config, data_root=data_root, device=device,
                           progress=progress)
        rows.append(clone_row(r, "edm", labels))
    return rows
