"""The adaptive averaging attack on EDM.

Kariyappa, Prakash, Qureshi. "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, appendix A.1. EDM answers each query with one member f_index(x) of its ensemble,
index(x) = 1 + H(x) % N. To estimate the ensemble's average prediction the attacker queries K
randomly perturbed copies x'_1..x'_K of each image (random affine + colour changes, large
enough to land on other members) and trains on the average answer:

    y(x) = 1/K * sum_{j=1..K} f_EDM(x'_j),      D_transfer = {(x, y(x))}

an adaptive KnockoffNets that spends K queries per image (Q / K images for a budget Q). EDM
Table 5 (MNIST): 51.3 % (EDM) -> 72.0 % (adaptive), undefended 90.2 %.

    attack = AdaptiveAveraging(fashion_train, k=5)
    result = attack(edm_blackbox, budget=50_000)   # 10,000 images x 5 queries
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stealguard.attacks.base import ATTACKS
from stealguard.attacks.knockoff import KnockoffNets
from stealguard.attacks.options import AttackerOptions, parse_options
from stealguard.attacks.transforms import AffineColorJitter
from stealguard.data import ImageDataset
from stealguard.errors import ConfigError
from stealguard.training import TrainConfig


@ATTACKS.register("adaptive_averaging")
class AdaptiveAveraging(KnockoffNets):
    """KnockoffNets whose every image is queried K times under random affine + colour changes,
    the K answers averaged.

    Args:
        surrogate: the attacker's image set.
        k: perturbed queries per image (the paper's K = 5).
        jitter: the transform ranges (default `AffineColorJitter()`); overrides options.jitter.
        options: the other attacker options (labels, arch, ...); nquery, nquery_mode and
            query_aug are this attack's own and may not be set.
        config, device, progress: as KnockoffNets.
    """

    def __init__(
        self, surrogate: ImageDataset, *, k: int = 5, jitter: AffineColorJitter | None = None,
        options: AttackerOptions | Mapping[str, Any] | None = None,
        config: TrainConfig | None = None, device: str | torch.device | None = "cpu",
        progress: bool = False,
    ) -> None:
        base = parse_options(options)
        if base.nquery != 1 or base.query_aug != "none" or base.nquery_mode != "average":
            raise ConfigError("adaptive_averaging sets nquery (= k), nquery_mode and query_aug "
                              "itself; pass k= and jitter= instead")
        if k < 1:
            raise ConfigError(f"k (queries per image) must be >= 1, got {k}")
        opts = parse_options(base, nquery=k, query_aug="affine_color", jitter=jitter)
        super().__init__(surrogate, config=config, device=device, progress=progress,
                         options=opts)
