"""`task: angular_deviation`: how far a defense turns the attacker's gradient (MAD Fig. 6, A8).

Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model
Stealing Attacks", ICLR 2020, sec. 5.2.3 (Fig. 6, 7) and appendix F.4 (Fig. A8). An attacker
model F(x; w) trains on the defended answers ỹ; at every step t, for the soft cross-entropy
L(w, t) = -mean_b sum_k t_bk log F(x_b; w)_k of the step's batch,

    u = ∇_w L(w_t, y)     (the true posteriors)      a = ∇_w L(w_t, ỹ)     (the defended ones)
    θ = arccos( u·a / (|u| |a|) )   in degrees,

computed as 2 atan2(|û - â|, |û + â|) (û = u / |u|), which is exact near 0° and 180°.
The attacker steps along a. The angle is that of the step's gradient: per query in the
white-box setting (batch size 1), per batch of 64 in the black-box one (our reading of F.4).

    whitebox   sec. 5.2.3: online SGD (lr 0.001, batch 1, no momentum) for N = 50K steps
               (Fig. 7's axis), each query drawn at random from B = `n` distinct images;
               MAD crafts ỹ with exact knowledge of w_t: its surrogate F is the attacker
               itself (a frozen copy that takes the attacker's weights before every query)
    blackbox   F.4: the defense keeps its own fixed surrogate (built from the victim, as in
               `steal`); ỹ is answered once for the KnockoffNets transfer set of `n` queries,
               and the attacker trains on it for 50 epochs (SGD lr 0.01, momentum 0.5,
               batch 64), the set shuffled every epoch

The training length is `iterations` (SGD steps) or `epochs` (passes of batches over the n
images) in either setting; `lr`, `momentum`, `batch_size` and the length left unset take
the setting's paper values above (so a quick scale can shorten both settings with one
`iterations`). Our choices: the attacker has the victim's architecture (`attacker_arch` to
change it), a seeded random initialisation and normalises with its query set's statistics
(as KnockoffNets); weight decay 0 (the paper names none). A model with BatchNorm computes
u and a in train mode (batch statistics) while MAD's white-box copy is in eval mode
(running statistics): exact for LeNet, close for VGG16-BN.

Metrics: angle_mean, angle_median (degrees), frac_over_90 (steps whose gradient is turned
more than 90°, i.e. the step increases the loss under y to first order), l1_mean (mean
|ỹ - y|_1 of the answers), test_loss (the attacker's cross-entropy on a seeded subset of the
victim's test set at the end) and attacker_accuracy there. Series: "angles" (every step's
angle, thinned evenly to `max_series`), "test_loss" and "test_loss_step" (Fig. 7 / A8's
bottom row: the test loss at `evals` + 1 evenly spaced steps, the first before training).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from stealguard.attacks.options import image_stats
from stealguard.data import ImageDataset, load_dataset
from stealguard.data.augment import to_shape
from stealguard.defenses import DEFENSES, MAD, Defense, DefenseConfig, build_defense
from stealguard.errors import ConfigError
from stealguard.models import MODELS, Classifier, build_model
from stealguard.pipeline import test_set_for
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.tasks.steal import defense_key
from stealguard.reproduce.victims import DatasetName, VictimConfig
from stealguard.training import predict, soft_cross_entropy, to_float_images

# the paper's optimisation of each setting (sec. 5.2.3; F.4); iterations: Fig. 7's 50K
PAPER = {
    "whitebox": {"lr": 0.001, "momentum": 0.0, "batch_size": 1, "iterations": 50_000},
    "blackbox": {"lr": 0.01, "momentum": 0.5, "batch_size": 64, "epochs": 50},
}


class AngularCell(CellBase):
    victim: VictimConfig
    defense: DefenseConfig
    setting: Literal["whitebox", "blackbox"]
    queries: DatasetName
    queries_split: str = "train"
    n: int | None = Field(None, ge=1, description="B distinct query images (None: all)")
    iterations: int | None = Field(None, ge=1, description="SGD steps (or give epochs)")
    epochs: int | None = Field(None, ge=1, description="passes over the n query images")
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    attacker_arch: str | None = None
    test_subset: int | None = Field(1000, ge=1, description="victim test images for the loss")
    evals: int = Field(20, ge=1, description="test-loss evaluations over training")
    max_series: int = Field(5000, ge=2, description="cap on the stored angles")

    @field_validator("attacker_arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is not None:
            MODELS.get(v)
        return v

    @model_validator(mode="after")
    def _paper_defaults(self) -> AngularCell:
        if self.iterations is not None and self.epochs is not None:
            raise ConfigError("angular_deviation: give the training length as iterations "
                              f"(steps) or epochs, not both (got {self.iterations} and "
                              f"{self.epochs})")
        paper = PAPER[self.setting]
        for name in ("lr", "momentum", "batch_size"):
            if getattr(self, name) is None:
                setattr(self, name, paper[name])
        if self.iterations is None and self.epochs is None:
            length = "iterations" if "iterations" in paper else "epochs"
            setattr(self, length, paper[length])
        return self

    def steps(self, n: int) -> int:
        """SGD steps for `n` query images: `iterations`, or `epochs` passes of batches."""
        if self.iterations is not None:
            return self.iterations
        return int(self.epochs or 0) * -(-n // int(self.batch_size or 1))


def gradient_angle(u: torch.Tensor, a: torch.Tensor) -> float:
    """Angle in degrees between two flat vectors (D,); NaN when either is zero."""
    nu, na = u.double().norm(), a.double().norm()
    if nu == 0 or na == 0:
        return float("nan")
    uh, ah = u.double() / nu, a.double() / na
    return float(torch.rad2deg(2 * torch.atan2((uh - ah).norm(), (uh + ah).norm())))


def step_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_tilde: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One forward, two backward passes: flat u = ∇L(w, y), flat a = ∇L(w, ỹ) (D,), and a
    per parameter (to step along)."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(x)  # (B, K)
    g_u = torch.autograd.grad(soft_cross_entropy(logits, y), params, retain_graph=True)
    g_a = torch.autograd.grad(soft_cross_entropy(logits, y_tilde), params)
    return torch.cat([g.flatten() for g in g_u]), torch.cat([g.flatten() for g in g_a]), list(g_a)


def _attacker(cell: Any, victim: nn.Module, queries: ImageDataset) -> Classifier:
    c, h, _ = victim.input_shape  # type: ignore[misc]
    mean, std = image_stats(queries, c)
    torch.manual_seed(cell.seed)
    return build_model(cell.attacker_arch or victim.arch, in_channels=c, image_size=h,  # type: ignore[arg-type]
                       num_classes=int(victim.num_classes), mean=mean, std=std)  # type: ignore[arg-type]


@torch.no_grad()
def _test_loss(model: nn.Module, test: ImageDataset, device: torch.device) -> tuple[float, float]:
    logits = predict(model, test.images, device=device)  # (T, K), leaves model in eval mode
    model.train()
    loss = nn.functional.cross_entropy(logits, test.labels)
    return float(loss), float((logits.argmax(1) == test.labels).double().mean())


def _batches(cell: Any, n: int) -> list[torch.Tensor]:
    """`cell.steps(n)` index batches: white-box draws every query at random (with
    replacement, sec. 5.2.3), black-box goes through the transfer set in shuffled epochs."""
    g = torch.Generator().manual_seed(cell.seed)
    steps = cell.steps(n)
    if cell.setting == "whitebox":
        return [torch.randint(n, (cell.batch_size,), generator=g) for _ in range(steps)]
    out: list[torch.Tensor] = []
    while len(out) < steps:
        out += torch.randperm(n, generator=g).split(cell.batch_size)
    return out[:steps]


def _answerer(cell: Any, victim: nn.Module, attacker: nn.Module,
              x_all: torch.Tensor, y_all: torch.Tensor, **components: Any
              ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(idx, x, y) -> ỹ, the defended answers the attacker receives. `components`: the
    models a defense needs besides the victim (adaptive_misinformation's)."""
    if cell.defense.name == "none":
        return lambda idx, x, y: y
    key = defense_key(cell.seed)
    factory = DEFENSES.get(cell.defense.name)
    if cell.setting == "whitebox" and isinstance(factory, type) and issubclass(factory, MAD):
        shadow = copy.deepcopy(attacker)  # MAD's surrogate: frozen, takes w_t before each query
        defense = build_defense(cell.defense.name, cell.defense.params, victim=victim, key=key,
                                surrogate=shadow)

        def answer(idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for ps, pa in zip(shadow.parameters(), attacker.parameters()):
                    ps.copy_(pa)
                for bs, ba in zip(shadow.buffers(), attacker.buffers()):
                    bs.copy_(ba)
            return defense(x, y)

        return answer
    defense = build_defense(cell.defense.name, cell.defense.params, victim=victim, key=key,
                            **components)
    y_tilde = _answer_all(defense, x_all, y_all)  # fixed: the transfer set is answered once
    return lambda idx, x, y: y_tilde[idx]


def _answer_all(defense: Defense, x_all: torch.Tensor, y_all: torch.Tensor,
                chunk: int = 256) -> torch.Tensor:
    return torch.cat([defense(to_float_images(xb), yb)
                      for xb, yb in zip(x_all.split(chunk), y_all.split(chunk))])


@TASKS.register("angular_deviation")
class AngularDeviation(Task):
    Cell = AngularCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        dev = ctx.device
        tv = ctx.victim(cell.victim)
        victim = tv.victim.model
        ds = load_dataset(cell.queries, cell.queries_split, data_root=ctx.data_root)
        if cell.n is not None:
            ds = ds.subset(cell.n, seed=cell.seed)
        c, h, _ = victim.input_shape
        x_all = to_shape(ds.images, c, h).to(dev)  # (B, C, H, W) uint8
        y_all = torch.softmax(predict(victim, x_all, device=dev), 1).to(dev)  # (B, K) true y
        test = test_set_for(tv.victim, data_root=ctx.data_root)
        if cell.test_subset is not None:
            test = test.subset(cell.test_subset, seed=cell.seed)
        attacker = _attacker(cell, victim, ds).to(dev).train()
        answer = _answerer(cell, victim, attacker, x_all, y_all, **tv.components)
        out = _train_and_measure(cell, attacker, answer, x_all, y_all, test, dev)
        victim.cpu()
        return out


def _train_and_measure(cell: Any, attacker: nn.Module,
                       answer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       x_all: torch.Tensor, y_all: torch.Tensor, test: ImageDataset,
                       dev: torch.device) -> CellResult:
    opt = torch.optim.SGD(attacker.parameters(), lr=cell.lr, momentum=cell.momentum)
    batches = _batches(cell, len(x_all))
    eval_at = set(torch.linspace(0, len(batches), cell.evals + 1).round().long().tolist())
    angles: list[float] = []
    l1: list[torch.Tensor] = []
    curve: list[float] = []
    curve_at: list[float] = []
    for step, idx in enumerate(batches):
        if step in eval_at:
            curve.append(_test_loss(attacker, test, dev)[0])
            curve_at.append(float(step))
        x, y = to_float_images(x_all[idx]), y_all[idx]  # (b, C, H, W), (b, K)
        y_tilde = answer(idx.to(dev), x, y).detach()
        l1.append((y_tilde - y).abs().sum(1).cpu())
        u, a, grads = step_gradients(attacker, x, y, y_tilde)
        angles.append(gradient_angle(u, a))
        for p, g in zip((p for p in attacker.parameters() if p.requires_grad), grads):
            p.grad = g
        opt.step()
    loss, acc = _test_loss(attacker, test, dev)
    curve.append(loss)
    curve_at.append(float(len(batches)))
    theta = torch.tensor(angles, dtype=torch.float64)
    theta = theta[theta.isfinite()]
    return CellResult(
        metrics={"angle_mean": float(theta.mean()), "angle_median": float(theta.median()),
                 "frac_over_90": float((theta > 90).double().mean()),
                 "l1_mean": float(torch.cat(l1).double().mean()), "test_loss": loss,
                 "attacker_accuracy": acc, "steps": float(len(batches))},
        series={"angles": _thin(theta, cell.max_series), "test_loss": curve,
                "test_loss_step": curve_at},
    )


def _thin(values: torch.Tensor, cap: int) -> list[float]:
    """At most `cap` values, evenly spaced over training (order kept)."""
    if values.numel() > cap:
        values = values[torch.linspace(0, values.numel() - 1, cap).round().long()]
    return values.tolist()
