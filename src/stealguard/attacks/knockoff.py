"""KnockoffNets, random strategy.

Orekondy, Schiele, Fritz. "Knockoff Nets: Stealing Functionality of Black-Box Models",
CVPR 2019. The attacker draws Q images at random from a surrogate dataset (its own data,
not the victim's), queries the black box with them and trains a clone on the answers:

    D_transfer = {(x_i, y_i = F_V(x_i))},  x_i ~ surrogate,  i = 1..Q
    clone = argmin_C  sum_i CE(y_i, C(x_i))        (soft: y_i the probabilities;
                                                     hard: argmax y_i)

EDM paper settings (section 5.1): surrogate FashionMNIST for MNIST, CIFAR-100 for
CIFAR-10, Q = 50,000, SGD lr 0.1, 50 epochs, cosine annealing. With the attacker options
(`AttackerOptions`) each image may be queried n times (Q / n images), transformed or not.

    attack = KnockoffNets(surrogate=fashion_train, labels="soft", arch="conv3")
    result = attack(blackbox, budget=50_000)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stealguard.attacks.base import ATTACKS, Attack, AttackResult, train_clone
from stealguard.attacks.options import (
    AttackerOptions,
    image_stats,
    parse_options,
    query_images,
    spendable,
)
from stealguard.blackbox import BlackBox
from stealguard.data import ImageDataset
from stealguard.data.augment import to_shape
from stealguard.training import TrainConfig


@ATTACKS.register("knockoff")
class KnockoffNets(Attack):
    """Random-strategy KnockoffNets.

    Args:
        surrogate: the attacker's image set (its labels are never used).
        options: the attacker's options (labels, arch, nquery, ...); see `AttackerOptions`.
        labels, arch, query_batch, seed: shortcuts that override the same `options` fields.
        config: clone training config (default: the EDM paper's SGD 0.1, 50 epochs, cosine).
        device: where the clone trains.
    """

    data_role = "surrogate"  # what `build_attack` hands it

    def __init__(
        self, surrogate: ImageDataset, *, labels: str | None = None, arch: str | None = None,
        config: TrainConfig | None = None, query_batch: int | None = None,
        seed: int | None = None, device: str | torch.device | None = "cpu",
        progress: bool = False, options: AttackerOptions | Mapping[str, Any] | None = None,
    ) -> None:
        self.options = parse_options(options, labels=labels, arch=arch, query_batch=query_batch,
                                     seed=seed)
        self.surrogate = surrogate
        self.config = config or TrainConfig(epochs=50, lr=0.1, optimizer="sgd",
                                            seed=self.options.seed)
        self.device, self.progress = device, progress

    @property
    def clone_config(self) -> TrainConfig:
        """The training of the clone this attack returns (also used by `accuracy_vs_budget`)."""
        return self.config

    def run(self, blackbox: BlackBox, budget: int) -> AttackResult:
        opts = self.options
        c, h, _ = blackbox.input_shape
        n = min(spendable(blackbox, budget) // opts.nquery, len(self.surrogate))
        g = torch.Generator().manual_seed(opts.seed)
        idx = torch.randperm(len(self.surrogate), generator=g)[:n]  # the random strategy
        images = to_shape(self.surrogate.images[idx], c, h)  # (n, C, H, W) uint8
        out = query_images(blackbox, images, opts, generator=g)  # rows (R, C, H, W), (R, K)
        mean, std = image_stats(self.surrogate, c)
        clone, tlog = train_clone(
            out.rows_x, out.rows_y, labels=opts.labels, arch=opts.arch,
            input_shape=blackbox.input_shape, num_classes=blackbox.num_classes, mean=mean,
            std=std, config=self.config, device=self.device, progress=self.progress,
        )
        log = [{"stage": "query", "images": n, "queries": out.queries},
               {"stage": "train", "rows": int(out.rows_x.shape[0]), "epochs": tlog.epochs,
                "seconds": tlog.seconds}]
        return AttackResult(clone=clone, transfer_x=out.rows_x, transfer_y=out.rows_y,
                            queries=out.queries, log=log, queries_per_row=out.queries_per_row)
