"""The adaptive averaging attack on EDM.

Kariyappa, Prakash, Qureshi. "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, appendix A.1. EDM answers each query with one member f_index(x) of its ensemble,
index(x) = 1 + H(x) % N. To estimate the ensemble's average prediction the attacker queries K
randomly perturbed copies x'_1..x'_K of each image (random affine + colour changes, large
enough to land on other members) and trains on the average answer:

    y(x) = 1/K * sum_{j=1..K} f_EDM(x'_j),      D_transfer = {(x, y(x))}

an adaptive KnockoffNets that spends K queries per image (Q / K images for a budget Q). EDM
Table 5 (MNIST): 51.3 % (EDM) -> 72.0 % (adaptive), undefended 90.2 %.

    attack = AdaptiveAveraging(fashion_train, {"k": 5})
    result = attack(edm_blackbox, budget=50_000)   # 10,000 images x 5 queries
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from stealguard.attacks.base import ATTACKS, AttackParams
from stealguard.attacks.knockoff import KnockoffNets
from stealguard.attacks.options import AttackerOptions, CloneOptions
from stealguard.attacks.transforms import AffineColorJitter


class AdaptiveParams(CloneOptions):
    """KnockoffNets' params without nquery / query_aug (this attack sets them): K and the
    transform ranges instead."""

    k: int = Field(5, ge=1, description="perturbed queries per image K, >= 1 (the paper's 5)")
    jitter: AffineColorJitter = Field(default_factory=lambda: AffineColorJitter(),
                                      description="the random affine + colour ranges")


@ATTACKS.register("adaptive_averaging")
class AdaptiveAveraging(KnockoffNets):
    """KnockoffNets whose every image is queried K times under random affine + colour changes,
    the K answers averaged.

    Args:
        data: the attacker's image set.
        params: `AdaptiveAveraging.Params`: k (perturbed queries per image, the paper's
            K = 5), jitter (the transform ranges, `AffineColorJitter()`), and the attacker's
            labels, arch, seed, query_batch, clone.
        device, progress, **fields: as KnockoffNets.
    """

    Params: ClassVar[type[AttackParams]] = AdaptiveParams

    def query_options(self) -> AttackerOptions:
        p = self.params
        assert isinstance(p, AdaptiveParams)
        return AttackerOptions(labels=p.labels, arch=p.arch, query_batch=p.query_batch,
                               seed=p.seed, nquery=p.k, nquery_mode="average",
                               query_aug="affine_color", jitter=p.jitter)
