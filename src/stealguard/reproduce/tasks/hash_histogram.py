"""`task: hash_histogram`: how often a perturbed image keeps its member (EDM App. A.2, Fig. 6).

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, appendix A.2: for each of `n_images` images, hash `n_perturb` random perturbations
x' of it, count index(x') = H(x') mod N per member, sort the counts in decreasing order, and
average the sorted histograms over the images (paper: 1000 CIFAR-10 train images, 10,000
perturbations each, N = 5). A perceptual hash puts most mass in the first bin; SHA-1 spreads
it evenly (1/N each).

    hash        dnn (the EDM victim's secret DNN pHash), dct (Zauner's pHash) or sha1
    victim      the EDM whose hash network is used; needed for `dnn` only
    images      the dataset of the images, read from `images_split`
    members     N; default the victim's member count (dnn), else 5 (the paper's N)
    strength    scales `random_perturbation`'s ranges (our stand-in for App. A.1's transforms)

Metrics: top1_share (mean fraction of an image's perturbations that land on its most frequent
member), entropy (mean per-image entropy of the index distribution, bits; log2 N for a
uniform spread), entropy_normalized (entropy / log2 N, in [0, 1]), and for dnn the hash
network's held-out accuracy on its secret task. Series: "histogram", the averaged sorted
histogram (length N, sums to 1).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from stealguard.data import load_dataset
from stealguard.data.augment import to_shape
from stealguard.ensemble import HASHES, EDMPredictor, ImageHash, sorted_index_histogram
from stealguard.errors import ConfigError
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.victims import DatasetName, VictimConfig

PAPER_MEMBERS = 5


def histogram_metrics(hist: torch.Tensor) -> dict[str, float]:
    """Per-image sorted histograms (B, N), rows summing to 1 -> the summary metrics."""
    n = hist.shape[1]
    p = hist.double()
    entropy = -(p * p.clamp_min(1e-300).log2()).sum(1)  # (B,) bits; 0 log 0 = 0
    return {"top1_share": float(p[:, 0].mean()), "entropy": float(entropy.mean()),
            "entropy_normalized": float(entropy.mean() / math.log2(n))}


class HashHistogramCell(CellBase):
    hash: Literal["dnn", "dct", "sha1"]
    victim: VictimConfig | None = None
    images: DatasetName
    images_split: str = "train"
    n_images: int = Field(1000, ge=1)
    n_perturb: int = Field(10_000, ge=1)
    members: int | None = Field(None, ge=2, description="N; default the victim's, else 5")
    strength: float = Field(1.0, ge=0)

    dataset_fields = ("images",)

    @model_validator(mode="after")
    def _victim_for_dnn(self) -> HashHistogramCell:
        if self.hash == "dnn" and (self.victim is None or self.victim.training != "edm"):
            raise ConfigError("hash_histogram: hash 'dnn' needs victim: an EDM (training: edm) "
                              "whose secret hash network it analyses")
        if self.hash != "dnn" and self.victim is not None:
            raise ConfigError(f"hash_histogram: hash {self.hash!r} takes no victim (only 'dnn' "
                              "uses the EDM's hash network); drop the victim field")
        return self


def _hash_and_shape(cell: Any, ctx: RunContext
                    ) -> tuple[ImageHash, int, tuple[int, int] | None, dict[str, float]]:
    """(hash, N, (C, H) the images must have or None, extra metrics)."""
    if cell.hash != "dnn":
        return HASHES.get(cell.hash)(), cell.members or PAPER_MEMBERS, None, {}
    tv = ctx.victim(cell.victim)
    edm = tv.victim.model
    if not isinstance(edm, EDMPredictor):
        raise ConfigError(f"hash_histogram: victim {cell.victim.key()} is not an EDM")
    if edm.hash_fn is None:
        raise ConfigError(f"hash_histogram: victim {cell.victim.key()} has no hash")
    c, h, _ = edm.input_shape
    extra = {k: float(tv.info[k]) for k in ("hash_accuracy",) if k in tv.info}
    return edm.hash_fn, cell.members or edm.n_members, (c, h), extra


@TASKS.register("hash_histogram")
class HashHistogram(Task):
    Cell = HashHistogramCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        hash_fn, members, shape, extra = _hash_and_shape(cell, ctx)
        ds = load_dataset(cell.images, cell.images_split, data_root=ctx.data_root)
        images = ds.subset(cell.n_images, seed=cell.seed).images  # (B, C, H, W) uint8
        if shape is not None:  # the hash network takes the victim's input shape
            images = to_shape(images, *shape)
        if isinstance(hash_fn, torch.nn.Module):
            hash_fn.to(ctx.device)
        hist = sorted_index_histogram(hash_fn, images.to(ctx.device), members=members,
                                      perturbations=cell.n_perturb, seed=cell.seed,
                                      strength=cell.strength).cpu()  # (B, N)
        if isinstance(hash_fn, torch.nn.Module):
            hash_fn.cpu()
        return CellResult(metrics={**histogram_metrics(hist), **extra, "members": float(members)},
                          series={"histogram": hist.double().mean(0).tolist()})
