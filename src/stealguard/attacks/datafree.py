"""What DFME (dfme.py) and MAZE (maze.py) share: a generator G and a clone C trained
adversarially, with G's gradient through the black box V estimated from V's answers alone.

Round r of both attacks (z ~ N(0, I), x = (tanh(G(z)) + 1) / 2, D a disagreement):

    (1) generator step  theta_G <- theta_G + lr_G * grad_{theta_G} (1/B) sum_i D(V(x_i), C(x_i))
        V has no gradient, so grad_x D is estimated by forward differences along m random
        unit directions u_j (uniform on the sphere of the d = C*H*W pre-tanh pixels):

            grad_x D(x) ~= (d / m) * sum_j [D(x + eps * u_j) - D(x)] / eps * u_j      (ZO)

        and back-propagated through G (chain rule, exact). The B * (m + 1) points of a round,
        perturbed and unperturbed, go to the black box as one batch.
    (2) clone steps     n_S times: a fresh batch x = G(z), answers y = V(x),
                        theta_C <- theta_C - lr_C * grad_{theta_C} L(y, C(x)).
    (3) the attack's own extra (MAZE: experience replay on earlier queries).

Each round costs B * (n_G * (m + 1) + n_S) queries (MAZE reuses the round's unperturbed
points as its first clone batch: one batch fewer). Rounds run while a whole round fits the
budget; the rest of the budget is spent on clone steps with a smaller last batch, so the
attack spends exactly min(budget, what the black box has left) and never asks for more.

Output modes. Probabilities and renormalised top-k answers are used as they come (a zero
probability is floored before any logarithm). One-hot answers (the black box's "label" mode,
a top-1 defense, or the attacker's labels="hard", which takes the argmax of whatever comes)
run the same algorithm on the one-hot vectors: the *hard-label variant* here is "treat the
label as a probability vector". Its finite differences only see the victim change where a
perturbation of size eps flips the label, so the generator is driven almost only by the
clone's side; expect a much weaker attack, which is what the datafree-table measures.

The clone and the generator never see the victim's data or statistics: the clone normalises
with mean = std = 0.5 per channel.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

from stealguard.attacks.base import Attack, AttackResult, validate_attack_params
from stealguard.attacks.options import CloneOptions, spendable
from stealguard.blackbox import BlackBox
from stealguard.errors import ConfigError
from stealguard.models import Classifier, build_model
from stealguard.models.generators import Generator, GeneratorConfig, build_generator, to_pixels
from stealguard.training import TrainConfig

Monitor = Callable[[Classifier], dict[str, float]]


class DataFreeParams(CloneOptions):
    """The adversarial loop's settings (labels, arch, seed from CloneOptions); DFME and MAZE
    set their papers' defaults. Unknown fields are refused."""

    generator: GeneratorConfig = Field(default_factory=GeneratorConfig,
                                       description="the registered generator and its sizes")
    batch: int = Field(256, ge=1, description="B: images per generator / clone step, >= 1")
    directions: int = Field(1, ge=1, description="m: random directions per image, >= 1")
    epsilon: float = Field(1e-3, gt=0, description="finite-difference step on the pre-tanh "
                           "image, > 0")
    generator_steps: int = Field(1, ge=1, description="n_G: generator steps per round, >= 1")
    clone_steps: int = Field(5, ge=1, description="n_S: clone steps per round, >= 1")
    clone_optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd or adam")
    lr_clone: float = Field(0.1, gt=0, description="the clone's learning rate, > 0")
    generator_optimizer: Literal["sgd", "adam"] = Field("adam", description="sgd or adam")
    lr_generator: float = Field(1e-4, gt=0, description="the generator's learning rate, > 0")
    momentum: float = Field(0.9, ge=0, description="SGD momentum, >= 0")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay, >= 0")
    schedule: Literal["multistep", "cosine", "constant"] = Field(
        "multistep", description="both learning rates over the rounds: multistep, cosine, "
        "constant")
    lr_steps: tuple[float, ...] = Field((0.1, 0.3, 0.5), description="multistep: fractions of "
                                        "the rounds where both rates are scaled")
    lr_scale: float = Field(0.3, gt=0, description="multistep: the factor at each step, > 0")
    prob_floor: float = Field(1e-8, gt=0, lt=1, description="floor of a probability before "
                              "its log, in (0, 1)")
    keep_transfer: int = Field(10_000, ge=0, description="clone-step queries kept in the "
                               "result (uniform reservoir sample), >= 0")
    log_every: int = Field(100_000, ge=1, description="queries between log entries, >= 1")

    @field_validator("clone")
    @classmethod
    def _no_offline_clone(cls, v: TrainConfig | None) -> TrainConfig | None:
        if v is not None:
            raise ValueError("a data-free attack trains its clone online, round by round: "
                             "set clone_optimizer, lr_clone, momentum, weight_decay, schedule")
        return v


class Reservoir:
    """A uniform sample of at most `capacity` (image, answer) rows of everything added
    (reservoir sampling, Vitter's algorithm R, one batch at a time). Images stored as float16."""

    def __init__(self, capacity: int, *, generator: torch.Generator) -> None:
        self.capacity, self.seen, self.g = capacity, 0, generator
        self.x: torch.Tensor | None = None  # (capacity, C, H, W) float16
        self.y: torch.Tensor | None = None  # (capacity, K) float32
        self.size = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        if self.x is None:
            self.x = torch.empty((self.capacity, *x.shape[1:]), dtype=torch.float16)
            self.y = torch.empty((self.capacity, y.shape[1]), dtype=torch.float32)
        assert self.y is not None
        x, y = x.detach().cpu(), y.detach().cpu().float()
        fill = min(self.capacity - self.size, x.shape[0])  # (a) free slots first
        if fill:
            self.x[self.size:self.size + fill] = x[:fill].half()
            self.y[self.size:self.size + fill] = y[:fill]
            self.size += fill
        rest = x.shape[0] - fill
        if rest:  # (b) row t (0-based) replaces a random slot with probability capacity / (t + 1)
            t = torch.arange(self.seen + fill, self.seen + fill + rest, dtype=torch.float64)
            j = (torch.rand(rest, generator=self.g, dtype=torch.float64) * (t + 1)).long()
            keep = j < self.capacity
            self.x[j[keep]] = x[fill:][keep].half()
            self.y[j[keep]] = y[fill:][keep]
        self.seen += x.shape[0]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.x is not None and self.y is not None and self.size > 0
        idx = torch.randint(0, self.size, (n,), generator=self.g)
        return self.x[idx].float(), self.y[idx]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x is None or self.y is None:
            return torch.zeros(0), torch.zeros(0)
        return self.x[:self.size].float(), self.y[:self.size].clone()


def zeroth_order_gradient(
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_pre: torch.Tensor,
    blackbox: BlackBox, *, epsilon: float, directions: int, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-difference estimate (ZO) of grad_{x_pre} objective at each row of x_pre.

    objective(images (P, C, H, W) in [0, 1], answers (P, K)) -> (P,) per-image values.
    x_pre: (N, C, H, W) pre-tanh points. One black-box query of N * (m + 1) images.
    Returns (grad (N, C, H, W), objective at x_pre (N,), images x (N, C, H, W), answers (N, K)).
    """
    n, m = x_pre.shape[0], directions
    shape, d = x_pre.shape[1:], x_pre[0].numel()
    x_pre = x_pre.detach()
    u = torch.randn((n, m, d), generator=generator).to(x_pre.device)
    u = u / u.norm(dim=2, keepdim=True)  # (N, m, d) unit directions
    pts = torch.cat([x_pre.view(n, 1, d) + epsilon * u, x_pre.view(n, 1, d)], dim=1)  # (N, m+1, d)
    images = to_pixels(pts).view(n * (m + 1), *shape)  # (N(m+1), C, H, W) in [0, 1]
    answers = blackbox.query(images).to(x_pre.device)  # the whole round's differences: one batch
    with torch.no_grad():
        values = objective(images, answers).view(n, m + 1)  # (N, m+1)
    diff = (values[:, :m] - values[:, m:]) / epsilon  # (N, m) directional derivatives
    grad = (d / m) * (diff.unsqueeze(2) * u).sum(1)  # (N, d)
    base = slice(m, None, m + 1)  # the unperturbed point of each image
    return grad.view(n, *shape), values[:, m], images[base], answers[base]


def one_hot_answers(answers: torch.Tensor) -> torch.Tensor:
    """(B, K) answers -> the one-hot of their argmax (the attacker's labels="hard")."""
    return F.one_hot(answers.argmax(1), answers.shape[1]).to(answers.dtype)


class DataFreeAttack(Attack):
    """The adversarial generator-clone loop; subclasses give the losses (and extras)."""

    Params: ClassVar[type[DataFreeParams]] = DataFreeParams
    params: DataFreeParams
    data_free: ClassVar[bool] = True  # build_attack hands it no data

    def __init__(
        self, data: object = None, params: BaseModel | Mapping[str, Any] | None = None, *,
        device: str | torch.device | None = "cpu", progress: bool = False,
        monitor: Monitor | None = None, **fields: Any,
    ) -> None:
        name = type(self).registered_name
        if data is not None:
            raise ConfigError(f"attack {name!r} is data-free: it takes no attacker images "
                              f"(got {type(data).__name__}); leave the data out")
        p = validate_attack_params(name, self.Params, params, **fields)
        assert isinstance(p, DataFreeParams)
        self.params = p
        self.device = torch.device(device or "cpu")
        self.progress, self.monitor = progress, monitor

    # --- what each paper defines -------------------------------------------------------
    @abstractmethod
    def clone_loss(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Scalar loss the clone minimises on a batch: logits (B, K), answers (B, K)."""

    @abstractmethod
    def disagreement(self, logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """(B,) per-image disagreement the generator maximises."""

    def round_queries(self) -> int:
        """Queries of one whole round."""
        p = self.params
        return p.batch * (p.generator_steps * (p.directions + 1) + p.clone_steps)

    def after_round(self, clone: Classifier, opt: torch.optim.Optimizer) -> int:
        """The attack's extra step after each round (MAZE: replay); returns queries spent (0)."""
        return 0

    # --- the loop -----------------------------------------------------------------------
    def answers_for_loss(self, answers: torch.Tensor) -> torch.Tensor:
        return one_hot_answers(answers) if self.params.labels == "hard" else answers

    def run(self, blackbox: BlackBox, budget: int) -> AttackResult:
        p, dev = self.params, self.device
        allowed = spendable(blackbox, budget)
        rounds = allowed // self.round_queries()
        torch.manual_seed(self.params.seed)
        self.rng = torch.Generator().manual_seed(self.params.seed)
        c, h, _ = blackbox.input_shape
        clone = build_model(self.params.arch, in_channels=c, image_size=h,
                            num_classes=blackbox.num_classes).to(dev)
        gen = build_generator(p.generator, channels=c, image_size=h).to(dev)
        opt_c = self._optimizer(clone, p.clone_optimizer, p.lr_clone)
        opt_g = self._optimizer(gen, p.generator_optimizer, p.lr_generator)
        scheds = [self._schedule(o, rounds) for o in (opt_c, opt_g)]
        self.kept = Reservoir(p.keep_transfer, generator=self.rng)
        self.spent, log, start = 0, [], time.perf_counter()
        next_log = p.log_every
        for r in range(rounds):
            loss_g = self._generator_steps(gen, clone, opt_g, blackbox)
            loss_c = self._clone_steps(gen, clone, opt_c, blackbox, p.clone_steps, p.batch)
            self.spent += self.after_round(clone, opt_c)
            for s in scheds:
                s.step()
            if self.spent >= next_log or r == rounds - 1:
                next_log += p.log_every
                log.append(self._log_entry(r + 1, loss_g, loss_c, clone, start))
        left = allowed - self.spent  # less than a round: clone steps only, exactly to the budget
        while left > 0:
            b = min(p.batch, left)
            self._clone_steps(gen, clone, opt_c, blackbox, 1, b)
            left -= b
        if not log or log[-1]["queries"] != self.spent:
            log.append(self._log_entry(rounds, float("nan"), float("nan"), clone, start))
        rows_x, rows_y = self.kept.rows()
        clone.eval().cpu()
        self.generator = gen.eval().cpu()
        return AttackResult(clone=clone, transfer_x=rows_x, transfer_y=rows_y,
                            queries=self.spent, log=log)

    def _generator_steps(self, gen: Generator, clone: Classifier, opt: torch.optim.Optimizer,
                         blackbox: BlackBox) -> float:
        p = self.params
        clone.eval()

        def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.disagreement(clone(x), self.answers_for_loss(y))

        value = torch.zeros(())
        for _ in range(p.generator_steps):
            gen.train()
            z = gen.sample(p.batch, generator=self.rng, device=self.device)
            x_pre = gen(z)  # (B, C, H, W)
            grad, value, x, y = zeroth_order_gradient(
                objective, x_pre, blackbox, epsilon=p.epsilon, directions=p.directions,
                generator=self.rng)
            self.spent += x_pre.shape[0] * (p.directions + 1)
            opt.zero_grad(set_to_none=True)
            x_pre.backward(-grad / x_pre.shape[0])  # ascend the mean disagreement
            opt.step()
            self.on_generator_batch(x, y)
        clone.train()
        return float(value.mean())

    def on_generator_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The unperturbed points of a generator step and their answers (MAZE reuses them)."""

    def clone_batch(self, gen: Generator, blackbox: BlackBox, n: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh batch of n generated images (n, C, H, W) and the black box's answers."""
        with torch.no_grad():
            x = to_pixels(gen(gen.sample(n, generator=self.rng, device=self.device)))
        y = blackbox.query(x).to(self.device)
        self.spent += n
        return x, y

    def _clone_steps(self, gen: Generator, clone: Classifier, opt: torch.optim.Optimizer,
                     blackbox: BlackBox, steps: int, n: int) -> float:
        clone.train()
        loss = torch.zeros(())
        for s in range(steps):
            x, y = self.next_clone_batch(gen, blackbox, n, s)
            self.kept.add(x, y)
            self.on_clone_batch(x, y)
            loss = self.clone_loss(clone(x), self.answers_for_loss(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

    def next_clone_batch(self, gen: Generator, blackbox: BlackBox, n: int, step: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clone_batch(gen, blackbox, n)

    def on_clone_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Each clone batch and its answers (MAZE stores them for replay)."""

    def _optimizer(self, net: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
        p = self.params
        if name == "adam":
            return torch.optim.Adam(net.parameters(), lr=lr)
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=p.momentum,
                               weight_decay=p.weight_decay)

    def _schedule(self, opt: torch.optim.Optimizer, rounds: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
        p = self.params
        if p.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, rounds))
        if p.schedule == "multistep":
            steps = sorted({max(1, int(f * rounds)) for f in p.lr_steps})
            return torch.optim.lr_scheduler.MultiStepLR(opt, steps, p.lr_scale)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def _log_entry(self, rounds: int, loss_g: float, loss_c: float, clone: Classifier,
                   start: float) -> dict[str, Any]:
        seconds = time.perf_counter() - start
        entry: dict[str, Any] = {"stage": "round", "rounds": rounds, "queries": self.spent,
                                 "generator_disagreement": loss_g, "clone_loss": loss_c,
                                 "seconds": seconds,
                                 "queries_per_second": self.spent / max(seconds, 1e-9)}
        if self.monitor is not None:
            was = clone.training
            entry.update(self.monitor(clone.eval()))
            clone.train(was)
        if self.progress:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in entry.items()), flush=True)
        return entry

