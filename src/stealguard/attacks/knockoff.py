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
Params: `AttackerOptions` (labels, arch, nquery, nquery_mode, query_aug, ..., clone).

    attack = KnockoffNets(fashion_train, {"labels": "soft", "arch": "conv3"})
    result = attack(blackbox, budget=50_000)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from stealguard.attacks.base import (
    ATTACKS,
    Attack,
    AttackParams,
    AttackResult,
    train_clone,
    validate_attack_params,
)
from stealguard.attacks.options import (
    AttackerOptions,
    CloneOptions,
    image_stats,
    query_images,
    spendable,
)
from stealguard.blackbox import BlackBox
from stealguard.data import ImageDataset
from stealguard.data.augment import to_shape
from stealguard.errors import ConfigError
from stealguard.training import TrainConfig


@ATTACKS.register("knockoff")
class KnockoffNets(Attack):
    """Random-strategy KnockoffNets.

    Args:
        data: the attacker's image set, the surrogate (its labels are never used).
        params: `KnockoffNets.Params` (or a mapping of its fields): the attacker's options
            (labels, arch, nquery, ...; see `AttackerOptions`) and `clone`, the clone's
            training (default: the EDM paper's SGD 0.1, 50 epochs, cosine).
        device: where the clone trains.
        **fields: shortcuts that override the same fields of `params` (labels="hard", ...).
    """

    Params: ClassVar[type[AttackParams]] = AttackerOptions

    def __init__(
        self, data: ImageDataset | None, params: BaseModel | Mapping[str, Any] | None = None,
        *, device: str | torch.device | None = "cpu", progress: bool = False, **fields: Any,
    ) -> None:
        name = type(self).registered_name
        p = validate_attack_params(name, self.Params, params, **fields)
        assert isinstance(p, CloneOptions)
        self.params: CloneOptions = p
        if not isinstance(data, ImageDataset):
            raise ConfigError(f"attack {name!r} needs the attacker's images (data=, an "
                              f"ImageDataset or a dataset name), got {type(data).__name__}")
        self.surrogate = data
        self.options = self.query_options()
        self.config = self.params.clone or TrainConfig(epochs=50, lr=0.1, optimizer="sgd",
                                                       seed=self.params.seed)
        self.device, self.progress = device, progress

    def query_options(self) -> AttackerOptions:
        """How each image is queried (nquery, transforms): the params themselves here."""
        assert isinstance(self.params, AttackerOptions)
        return self.params

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
