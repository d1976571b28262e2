"""The attacker's options, shared by every attack, and the one query path that applies them.

Orekondy, Schiele, Fritz. "Prediction Poisoning: Towards Defenses Against DNN Model Stealing
Attacks", ICLR 2020, section 5.2.3 "Subverting the defense": the attacker may

    (a) argmax   train on the most-confident label only       labels="hard"
    (b) arch-*   train another architecture than the victim's arch="resnet20"
    (c) nquery   query each image several times               nquery=n
    (d) nquery+aug  same, with random crop and flip           nquery=n, query_aug="crop_flip"
    (e) opt-*    use another optimizer                        TrainConfig(optimizer="adam")

With n queries of image x (transformed or not), x_1..x_n, the answers are either averaged,

    y(x) = 1/n * sum_j F_V(x_j)               nquery_mode="average"  (one row (x, y) per image)

or each kept as its own row (x_j, F_V(x_j))  nquery_mode="each"     (n rows per image).
The adaptive averaging attack on EDM (EDM appendix A.1) is the average mode with random
affine + colour transforms (query_aug="affine_color"), K = n = 5.

    opts = AttackerOptions(labels="hard", nquery=3, query_aug="crop_flip")

`CloneOptions` (labels, arch, query_batch, seed, clone) is what every attack's `Params`
extends; `AttackerOptions` adds the nquery options to it for the attacks that take them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, Field, ValidationError, field_validator

from stealguard.attacks.base import AttackParams
from stealguard.attacks.transforms import AffineColorJitter, random_affine_color
from stealguard.blackbox import BlackBox
from stealguard.data import ImageDataset
from stealguard.data.augment import augment_batch
from stealguard.errors import ConfigError
from stealguard.models import MODELS
from stealguard.training import TrainConfig, to_float_images

LABEL_MODES = ("soft", "hard")
M = TypeVar("M", bound=BaseModel)


class CloneOptions(AttackParams):
    """What every attacker controls: the labels it trains on, the clone, its randomness.

    The `Params` of every attack extend this (unknown fields are refused).
    """

    labels: str = Field("soft", description="soft (train on the probabilities) or hard "
                        "(on their argmax)")
    arch: str = Field("conv3", description="the clone's architecture, a registered model "
                      "(the papers use the victim's; `steal` defaults to it)")
    query_batch: int = Field(512, ge=1, description="images per black-box query call, >= 1")
    seed: int = Field(0, description="every random choice of the attack (images, targets, "
                      "transforms), and the default clone training's seed")
    clone: TrainConfig | None = Field(None, description="the training of the clone the attack "
                                      "returns (None: the attack's default)")

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, v: str) -> str:
        if v not in LABEL_MODES:
            raise ValueError(f"unknown label mode {v!r}; valid: {', '.join(LABEL_MODES)}")
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in MODELS:
            valid = ", ".join(MODELS.names())
            raise ValueError(f"unknown clone architecture {v!r}; valid: {valid}")
        return v


class AttackerOptions(CloneOptions):
    """The MAD paper's attacker options (section 5.2.3) besides the attack's own algorithm.

    nquery: answers per image; each image costs `nquery` queries.
    nquery_mode: "average" one row per image with the mean answer; "each" one row per query.
    query_aug: how each of the `nquery` copies is transformed before it is sent.
    crop_padding, flip: the crop-and-flip of query_aug="crop_flip".
    jitter: the random affine + colour ranges of query_aug="affine_color".
    The clone's initialisation and batch order come from its TrainConfig.seed.
    """

    nquery: int = Field(1, ge=1, description="answers per image, >= 1 (each costs a query)")
    nquery_mode: Literal["average", "each"] = Field(
        "average", description="average: one row per image with the mean answer; each: one "
        "row per query")
    query_aug: Literal["none", "crop_flip", "affine_color"] = Field(
        "none", description="the transform of each of the nquery copies: none, crop_flip, "
        "affine_color")
    crop_padding: int = Field(4, ge=0, description="query_aug=crop_flip: padding, >= 0")
    flip: bool = Field(True, description="query_aug=crop_flip: random horizontal flips")
    jitter: AffineColorJitter = Field(default_factory=lambda: AffineColorJitter(),
                                      description="query_aug=affine_color: the ranges")


def parse_model(cls: type[M], value: BaseModel | Mapping[str, Any] | None, what: str,
                **overrides: Any) -> M:
    """Build `cls` from an instance, a mapping or None, apply overrides (None = keep), and turn
    pydantic's ValidationError into a ConfigError that names the fields and the valid ones."""
    base = value.model_dump() if isinstance(value, BaseModel) else dict(value or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(base)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(options)'}: {e['msg']}" for e in err.errors()
        )
        valid = ", ".join(cls.model_fields)
        raise ConfigError(f"invalid {what}: {problems} (valid {what}: {valid})") from None


def parse_options(value: BaseModel | Mapping[str, Any] | None = None,
                  **overrides: Any) -> AttackerOptions:
    """AttackerOptions from an instance / mapping / None plus keyword overrides."""
    return parse_model(AttackerOptions, value, "attacker options", **overrides)


@dataclass
class QueryOutcome:
    rows_x: torch.Tensor  # (R, C, H, W) the transfer-set inputs these queries produced
    rows_y: torch.Tensor  # (R, K) their answers (averaged in "average" mode)
    mean_y: torch.Tensor  # (N, K) mean answer of each of the N distinct images
    queries: int          # N * nquery

    @property
    def queries_per_row(self) -> int:
        return self.queries // max(1, self.rows_x.shape[0])


def query_images(blackbox: BlackBox, images: torch.Tensor, options: AttackerOptions, *,
                 generator: torch.Generator) -> QueryOutcome:
    """Query every image (N, C, H, W) `options.nquery` times, as the options say. Costs N * n."""
    n, k = options.nquery, blackbox.num_classes
    rows_x, rows_y, means = [], [], []
    for xb in images.split(max(1, options.query_batch // n)):  # (b, C, H, W)
        copies = perturb(xb.repeat_interleave(n, dim=0), options, generator)  # (b*n, C, H, W)
        answers = blackbox.query(copies).float()  # (b*n, K), image i's copies adjacent
        mean = answers.view(-1, n, k).mean(1)  # (b, K)
        means.append(mean)
        if options.nquery_mode == "average":
            rows_x.append(xb)
            rows_y.append(mean)
        else:
            rows_x.append(copies)
            rows_y.append(answers)
    if not means:
        empty_x = images.new_zeros((0, *images.shape[1:]))
        return QueryOutcome(empty_x, torch.zeros(0, k), torch.zeros(0, k), 0)
    return QueryOutcome(torch.cat(rows_x), torch.cat(rows_y), torch.cat(means),
                        images.shape[0] * n)


def perturb(x: torch.Tensor, options: AttackerOptions, generator: torch.Generator) -> torch.Tensor:
    """The query-time transform of each copy (B, C, H, W); the identity for query_aug="none"."""
    if options.query_aug == "none":
        return x
    xf = to_float_images(x)  # (B, C, H, W) float [0, 1]
    if options.query_aug == "crop_flip":
        return augment_batch(xf, crop_padding=options.crop_padding, flip=options.flip,
                             generator=generator)
    return random_affine_color(xf, options.jitter, generator=generator)


def image_stats(data: ImageDataset | torch.Tensor, channels: int
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std the attacker normalises its clone with: its own data's statistics,
    averaged over channels when the channel count differs from the victim's."""
    if isinstance(data, ImageDataset):
        mean, std = tuple(data.mean), tuple(data.std)
    else:
        x = to_float_images(data[:10_000])  # (n, C, H, W)
        mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return mean, std


def spendable(blackbox: BlackBox, budget: int) -> int:
    """The queries an attack may spend: its budget, capped by what the black box has left."""
    left = blackbox.remaining
    return budget if left is None else max(0, min(budget, left))
