"""Jacobian-based Dataset Augmentation (JBDA), and the rounds every Jacobian attack shares.

Papernot, McDaniel, Goodfellow, Jha, Celik, Swami. "Practical Black-Box Attacks against Machine
Learning", AsiaCCS 2017. From a small seed set S_0 of in-distribution images, round rho:

    (i)   label   D_rho = {(x, F_V(x)) : x in S_rho}            (only the new points are queried)
    (ii)  train   the clone C on D_0 u ... u D_rho
    (iii) augment S_{rho+1} = {x + lambda_rho * sign(grad_x L(C(x; theta_c), y)) : x in S_rho}

as the EDM paper writes step (iii) (section 5.1): x'_i = x_i + beta * sign(grad_x L(C(x_i), y_i)),
y_i the answered label, L the cross-entropy; pixels are clipped to [0, 1]. Papernot's periodic
step lambda_rho = lambda * (-1)^floor(rho / tau) and reservoir sampling (after sigma rounds only
kappa points of the set are augmented) are options. The Jacobians of a round are one batched
backward pass (per `grad_batch` chunk): the loss is summed, so each image's gradient is its own.

Presets:
    "edm"  EDM section 5.1: 6 rounds, beta = 0.2, each round 10 epochs of Adam (lr 1e-3), the
           clone trained on through the rounds.
    "mad"  MAD appendix D: seed sets 100 (MNIST, FashionMNIST) / 500 (CIFAR-10) / 1000
           (CIFAR-100), step 0.1, rounds until the budget is spent, Papernot's tau = 5 (the
           authors' code); a fresh clone each round (20 epochs SGD 0.1) and a final fresh clone
           on the whole transfer set (MAD section 5.1: SGD lr 0.1, momentum 0.5, 30 epochs).

Params (`JacobianParams`): preset, seed_size, rounds, step, tau, kappa, sigma, round_config,
warm_start, grad_batch, and the attacker's options (labels, arch, nquery, ..., clone).

    attack = JBDA(mnist_train, {"preset": "edm", "seed_size": 128})
    result = attack(blackbox, budget=50_000)

JBDA-TR, JB-self and JB-top3 (jbda_tr.py, jb_self.py, jb_top3.py) change only step (iii).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    image_stats,
    parse_model,
    query_images,
    spendable,
)
from stealguard.blackbox import BlackBox
from stealguard.data import ImageDataset
from stealguard.errors import ConfigError, InputError
from stealguard.models import Classifier
from stealguard.training import TrainConfig, to_float_images


class JacobianConfig(BaseModel):
    """The rounds of a Jacobian attack. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    rounds: int | None = 6          # query -> train (-> augment) rounds; None: until the budget
    step: float = Field(default=0.2, gt=0)  # lambda (beta in EDM), in pixel units of [0, 1]
    tau: int | None = Field(default=None, ge=1)     # flip the step's sign every tau rounds
    kappa: int | None = Field(default=None, ge=1)   # reservoir: augment only kappa points ...
    sigma: int = Field(default=3, ge=0)             # ... from round sigma on
    round_config: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=10, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant"))
    final_config: TrainConfig | None = None  # train a fresh clone on everything at the end
    warm_start: bool = True         # keep training one clone through the rounds
    grad_batch: int = Field(default=1024, ge=1)  # images per batched backward pass

    @field_validator("rounds")
    @classmethod
    def _positive_rounds(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"rounds must be >= 1 (round 1 queries the seed set and trains), "
                             f"got {v}; use None to run until the budget is spent")
        return v

    @property
    def clone_config(self) -> TrainConfig:
        """The training of the clone that is returned."""
        return self.final_config or self.round_config


JACOBIAN_PRESETS: dict[str, JacobianConfig] = {
    "edm": JacobianConfig(),
    "mad": JacobianConfig(
        rounds=None, step=0.1, tau=5, warm_start=False,
        round_config=TrainConfig(epochs=20, optimizer="sgd", lr=0.1, momentum=0.9),
        final_config=TrainConfig(epochs=30, optimizer="sgd", lr=0.1, momentum=0.5),
    ),
}
# MAD appendix D's seed-set sizes; EDM gives none (we default to 128, below).
MAD_SEED_SIZES = {"mnist": 100, "fashionmnist": 100, "cifar10": 500, "cifar100": 1000}
DEFAULT_SEED_SIZE = 128


def jacobian_config(preset: str = "edm", overrides: JacobianConfig | Mapping[str, Any] | None
                    = None) -> JacobianConfig:
    """A preset's JacobianConfig with fields replaced by `overrides` (an instance wins whole)."""
    if isinstance(overrides, JacobianConfig):
        return overrides
    if preset not in JACOBIAN_PRESETS:
        raise ConfigError(f"unknown Jacobian preset {preset!r}; valid: "
                          f"{', '.join(JACOBIAN_PRESETS)}")
    return parse_model(JacobianConfig, JACOBIAN_PRESETS[preset], "jacobian config",
                       **dict(overrides or {}))


def sign_gradient(clone: Classifier, x: torch.Tensor, labels: torch.Tensor, *,
                  grad_batch: int = 1024) -> torch.Tensor:
    """sign(grad_x L(C(x), labels)) for every image: x (B, C, H, W), labels (B,) -> (B, C, H, W).

    One backward pass per `grad_batch` images; the summed loss keeps each image's gradient its
    own (the clone is in eval mode, so no batch statistics mix images)."""
    clone.eval()
    dev = next(clone.parameters()).device
    out = []
    for xb, yb in zip(x.split(grad_batch), labels.split(grad_batch)):
        xb = to_float_images(xb.to(dev)).requires_grad_(True)  # (b, C, H, W)
        loss = F.cross_entropy(clone(xb).float(), yb.to(dev), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)  # (b, C, H, W), parameters untouched
        out.append(grad.sign().cpu())
    return torch.cat(out) if out else torch.zeros_like(x, dtype=torch.float32)


class JacobianParams(AttackerOptions):
    """The Jacobian family's parameters: the preset, its overrides, the seed-set size, and
    the attacker's options. A field left at None takes the preset's value."""

    preset: Literal["edm", "mad"] = Field("edm", description="edm (EDM section 5.1) or mad "
                                          "(MAD appendix D): the defaults of the fields below")
    seed_size: int | None = Field(None, ge=1, description=(
        "seed images drawn at random from the data, >= 1; default: the preset's (edm 128; "
        "mad 100 MNIST/FashionMNIST, 500 CIFAR-10, 1000 CIFAR-100), or all of a smaller set"))
    rounds: int | Literal["budget"] | None = Field(None, description=(
        "query -> train (-> augment) rounds, >= 1, or 'budget' (until the budget is spent); "
        "default: the preset's (edm 6, mad budget)"))
    step: float | None = Field(None, gt=0, description="lambda (EDM's beta) in pixel units "
                               "of [0, 1], > 0; default: the preset's (edm 0.2, mad 0.1)")
    tau: int | None = Field(None, ge=1, description="flip the step's sign every tau rounds, "
                            ">= 1; default: the preset's (edm never, mad 5)")
    kappa: int | None = Field(None, ge=1, description="reservoir: augment only kappa points "
                              "per round, >= 1 (default: all)")
    sigma: int | None = Field(None, ge=0, description="... from round sigma on, >= 0 "
                              "(default 3)")
    round_config: TrainConfig | None = Field(None, description=(
        "each round's clone training; default: the preset's (edm 10 epochs Adam 1e-3, "
        "mad 20 epochs SGD 0.1); under edm it is the returned clone's too, so give clone"))
    warm_start: bool | None = Field(None, description="keep training one clone through the "
                                    "rounds; default: the preset's (edm yes, mad no)")
    grad_batch: int = Field(1024, ge=1, description="images per batched backward pass, >= 1")

    @field_validator("rounds")
    @classmethod
    def _positive_rounds(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"rounds must be >= 1 (round 1 queries the seed set and trains), "
                             f"got {v}; use 'budget' to run until the budget is spent")
        return v

    def jacobian_config(self) -> JacobianConfig:
        """The preset's JacobianConfig with the fields given here; `clone` replaces the
        preset's final training if it has one, else every round's."""
        overrides: dict[str, Any] = {f: getattr(self, f) for f in _JACOBIAN_FIELDS
                                     if getattr(self, f) is not None}
        if self.rounds == "budget":
            overrides["rounds"] = None
        cfg = jacobian_config(self.preset, overrides)
        if self.clone is not None:
            if cfg.final_config is not None:
                cfg = cfg.model_copy(update={"final_config": self.clone})
            elif self.round_config is not None:
                raise ConfigError(f"preset {self.preset!r} trains the returned clone in its "
                                  "rounds: give clone or round_config, not both")
            else:
                cfg = cfg.model_copy(update={"round_config": self.clone})
        return cfg


_JACOBIAN_FIELDS = ("rounds", "step", "tau", "kappa", "sigma", "round_config", "warm_start",
                    "grad_batch")


class JacobianAttack(Attack):
    """The rounds of Papernot's algorithm; subclasses give step (iii) as `augment`.

    Args:
        data: in-distribution images (an ImageDataset or uint8/float (N, C, H, W)) of the
            victim's shape; `seed_size` of them, drawn at random (seeded by `seed`), are the
            seed set S_0, and every one of them is queried.
        params: `JacobianParams` (or a mapping of its fields): preset ("edm" or "mad", see
            the module docstring), its overrides (rounds, step, tau, ...), seed_size, the
            attacker's options (labels, arch, nquery, ...) and `clone`, the training of the
            returned clone (replaces the preset's final training if it has one, else each
            round's).
        device, progress: where the clone trains; a progress bar.
        **fields: shortcuts that override the same fields of `params`.
    """

    Params: ClassVar[type[AttackParams]] = JacobianParams
    points_per_image = 1  # new points step (iii) makes from one point

    def __init__(
        self, data: ImageDataset | torch.Tensor | None,
        params: BaseModel | Mapping[str, Any] | None = None, *,
        device: str | torch.device | None = "cpu", progress: bool = False, **fields: Any,
    ) -> None:
        name = type(self).registered_name or type(self).__name__
        p = validate_attack_params(name, self.Params, params, **fields)
        assert isinstance(p, JacobianParams)
        self.params = p
        self.jacobian = p.jacobian_config()
        self.options: AttackerOptions = p
        images = data.images if isinstance(data, ImageDataset) else data
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
            raise InputError(f"attack {name!r} needs in-distribution seed images (data=, at "
                             "least one image (N, C, H, W)), got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        self.seed_set: ImageDataset | torch.Tensor = data if data is not None else images
        self.seed_images = self._seed_subset(images, getattr(data, "name", ""))
        self.device, self.progress = device, progress

    def _seed_subset(self, images: torch.Tensor, dataset: str) -> torch.Tensor:
        """S_0: `seed_size` images drawn at random (all of them, shuffled, when fewer)."""
        p = self.params
        assert isinstance(p, JacobianParams)
        size = p.seed_size
        if size is None:
            default = MAD_SEED_SIZES.get(dataset, 100) if p.preset == "mad" else DEFAULT_SEED_SIZE
            size = min(default, images.shape[0])
        if size > images.shape[0]:
            raise ConfigError(f"seed_size {size} exceeds the {images.shape[0]} images of "
                              f"{dataset or 'the seed data'}")
        idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(p.seed))
        return images[idx[:size]]

    @property
    def clone_config(self) -> TrainConfig:
        return self.jacobian.clone_config

    @abstractmethod
    def augment(self, clone: Classifier, x: torch.Tensor, answers: torch.Tensor, *,
                step: float, generator: torch.Generator) -> torch.Tensor:
        """Step (iii): points x (B, C, H, W) float with their answers (B, K) -> new points
        (B * points_per_image, C, H, W) in [0, 1]."""

    def run(self, blackbox: BlackBox, budget: int) -> AttackResult:
        opts, cfg = self.options, self.jacobian
        cap = spendable(blackbox, budget)  # what this run may spend
        seed_x = self._checked_seed(blackbox, cap)
        g = torch.Generator().manual_seed(opts.seed)
        first = query_images(blackbox, seed_x, opts, generator=g)
        points_x, points_y = seed_x, first.mean_y  # S_rho and its answers, (N, ...)
        rows_x, rows_y, spent = [first.rows_x], [first.rows_y], first.queries
        log: list[dict[str, Any]] = [{"round": 0, "stage": "query", "new": len(seed_x),
                                      "queries": spent}]
        clone: Classifier | None = None
        rnd = 0
        while True:
            left = (cap - spent) // opts.nquery  # new points still affordable
            last = (cfg.rounds is not None and rnd + 1 >= cfg.rounds) or left == 0
            if last and cfg.final_config is not None:
                break  # the final fresh clone replaces this round's
            clone = self._train(torch.cat(rows_x), torch.cat(rows_y), blackbox, clone, rnd, log)
            if last:
                break
            new_x = self._new_points(clone, points_x, points_y, rnd, left, g)
            if new_x.shape[0] == 0:
                break
            out = query_images(blackbox, new_x, opts, generator=g)
            spent += out.queries
            rows_x.append(out.rows_x)
            rows_y.append(out.rows_y)
            points_x, points_y = torch.cat([points_x, new_x]), torch.cat([points_y, out.mean_y])
            rnd += 1
            log.append({"round": rnd, "stage": "query", "new": len(new_x), "queries": spent})
        if cfg.final_config is not None:
            clone = self._train(torch.cat(rows_x), torch.cat(rows_y), blackbox, None, rnd, log,
                                config=cfg.final_config)
        assert clone is not None
        return AttackResult(clone=clone, transfer_x=torch.cat(rows_x),
                            transfer_y=torch.cat(rows_y), queries=spent, log=log,
                            queries_per_row=first.queries_per_row)

    def _checked_seed(self, blackbox: BlackBox, budget: int) -> torch.Tensor:
        """The seed images as float (N, C, H, W), refused if they don't fit victim or budget."""
        x = self.seed_images
        if tuple(x.shape[1:]) != tuple(blackbox.input_shape):
            name = getattr(self.seed_set, "name", "the seed set")
            raise InputError(f"seed set {name} has images of shape {tuple(x.shape[1:])}, the "
                             f"victim takes {tuple(blackbox.input_shape)}; JBDA needs "
                             f"in-distribution seed images of the victim's shape")
        need = x.shape[0] * self.options.nquery
        if need > budget:
            raise ConfigError(f"query budget {budget} is smaller than the seed set: "
                              f"{x.shape[0]} seed images x nquery {self.options.nquery} = {need} "
                              f"queries; raise the budget or use a smaller seed set")
        return to_float_images(x)

    def _new_points(self, clone: Classifier, px: torch.Tensor, py: torch.Tensor, rnd: int,
                    left: int, g: torch.Generator) -> torch.Tensor:
        """Step (iii) on S_rho (or its reservoir sample), cut to the `left` affordable points."""
        cfg = self.jacobian
        idx = torch.arange(px.shape[0])
        if cfg.kappa is not None and rnd >= cfg.sigma and px.shape[0] > cfg.kappa:
            idx = torch.randperm(px.shape[0], generator=g)[:cfg.kappa].sort().values
        idx = idx[:math.ceil(left / self.points_per_image)]  # no work beyond the budget
        step = cfg.step * (-1) ** (rnd // cfg.tau) if cfg.tau else cfg.step
        return self.augment(clone, px[idx], py[idx], step=step, generator=g)[:left]

    def _train(self, x: torch.Tensor, y: torch.Tensor, blackbox: BlackBox,
               clone: Classifier | None, rnd: int, log: list[dict[str, Any]], *,
               config: TrainConfig | None = None) -> Classifier:
        """Train (continue, if warm_start) the clone on all rows so far."""
        cfg = self.jacobian
        mean, std = image_stats(self.seed_set, blackbox.input_shape[0])
        clone, tlog = train_clone(
            x, y, labels=self.options.labels, arch=self.options.arch,
            input_shape=blackbox.input_shape, num_classes=blackbox.num_classes, mean=mean,
            std=std, config=config or cfg.round_config, device=self.device,
            progress=self.progress, clone=clone if cfg.warm_start and config is None else None,
        )
        log.append({"round": rnd, "stage": "final" if config else "train", "rows": len(x),
                    "loss": tlog.epochs[-1]["loss"] if tlog.epochs else None,
                    "seconds": tlog.seconds})
        return clone


@ATTACKS.register("jbda")
class JBDA(JacobianAttack):
    """Papernot's JBDA: x' = clip(x + lambda * sign(grad_x L(C(x), y))), y the answered label
    (the argmax of the black box's answer)."""

    def augment(self, clone: Classifier, x: torch.Tensor, answers: torch.Tensor, *,
                step: float, generator: torch.Generator) -> torch.Tensor:
        y = answers.argmax(1)  # (B,) the oracle's label
        grad_sign = sign_gradient(clone, x, y, grad_batch=self.jacobian.grad_batch)
        return (x + step * grad_sign).clamp(0.0, 1.0)  # (B, C, H, W)
