"""`task: toy2d`: the EDM paper's toy experiment (Figure 1) on a 2-D problem.

Kariyappa, Prakash & Qureshi, "Protecting DNNs from Theft using an Ensemble of Diverse
Models", ICLR 2021, Figure 1: (a) a target's training data and decisions, (b) the OOD
surrogate points an attacker queries it with, (c) the clone trained on its answers. The
clone of an undefended target recovers its decision boundary; the clone of an EDM target,
whose members disagree off the data and are picked by an input hash, does not.

Our setup (the paper gives no sizes):

    data      `classes` Gaussian blobs (std 0.3) centred on a circle of radius 0.8, seeded;
              the paper's problem is binary (classes: 2), 3 classes make the effect robust
    target    standard: one MLP (2 -> hidden -> hidden -> K), cross-entropy
              edm: `members` such MLPs trained jointly on eq. 3,
                   1/N sum_i CE(f_i(x), y) + lambda_D DivLoss({f_i(x~)}),
              x~ uniform over the box [-box, box]^2, minus points within `query_margin`
              of a training point (fresh points every step)
    hash      H(x) = argmax f_H(x) mod N, f_H a secret random MLP (2 -> 16 -> 16 -> N * m,
              m = 2 sub-classes per member, as the paper's M * m outputs), seeded from the
              cell's seed. Like the paper's DNN hash it is piecewise constant: nearby inputs
              get the same member (invariance), the regions are secret and irregular.
              Chosen over a hashed grid cell because it is the paper's construction in 2-D;
              both degrade the clone alike in our runs.
    attacker  `n_queries` points uniform over the same box, minus those within
              `query_margin` of a training point (OOD, as Fig. 1b); soft labels; an MLP
              clone of the target's width trained with soft cross-entropy
    training  full batch, Adam (lr `lr`), one step per epoch; all on the CPU (tiny models,
              and CPU keeps every engine's numbers identical)

With query_margin = 0 a few queries land on the data, where EDM's members agree, and they
pin the clone's boundary: the effect mostly disappears.

Metrics (fractions in [0, 1]): target_accuracy, clone_accuracy (in-distribution test
points), agreement (clone vs target on them), normalized_accuracy (clone / target).
Series (what `plots.regions` draws): `extent` [x0, x1, y0, y1]; `target_grid`, `clone_grid`,
`hash_grid` (argmax / member index on a grid_size x grid_size grid over the box, row-major,
row 0 at y0); `train_x`, `train_y`, `train_label` (up to `n_show` training points);
`query_x`, `query_y`, `query_label` (the queries and the target's argmax answers).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stealguard.ensemble.diversity import edm_loss
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task

HASH_WIDTH, HASH_SUBCLASSES = 16, 2


class Toy2dCell(CellBase):
    training: Literal["standard", "edm"] = "standard"
    classes: int = Field(3, ge=2, le=10)
    n_train: int = Field(400, ge=10)
    n_test: int = Field(2000, ge=10)
    n_queries: int = Field(500, ge=10)
    members: int = Field(5, ge=2, description="N, for training: edm")
    lambda_d: float = Field(1.0, ge=0)
    epochs: int = Field(300, ge=1, description="full-batch steps of the target")
    clone_epochs: int = Field(500, ge=1, description="full-batch steps of the clone")
    hidden: int = Field(32, ge=2)
    lr: float = Field(0.01, gt=0)
    ood_batch: int = Field(256, ge=1, description="OOD points per step of the EDM loss")
    box: float = Field(3.0, gt=0, description="queries and OOD points in [-box, box]^2")
    query_margin: float = Field(0.3, ge=0, description="min distance of a query to the data")
    grid_size: int = Field(100, ge=2, description="resolution of the drawn decision regions")
    n_show: int = Field(200, ge=0, description="training points kept for the figure")


class StackedMLP(nn.Module):
    """N independent MLPs 2 -> h -> h -> K evaluated at once: (B, 2) -> (N, B, K)."""

    def __init__(self, n: int, hidden: int, k: int, *, gen: torch.Generator,
                 bias_std: float = 0.0) -> None:
        super().__init__()
        dims = [(2, hidden), (hidden, hidden), (hidden, k)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(n, i, o, generator=gen) / math.sqrt(i)) for i, o in dims)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.randn(n, 1, o, generator=gen) * bias_std) for _, o in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)  # (N, B, 2)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("nbi,nio->nbo", h, w) + b
            if j < len(self.weights) - 1:
                h = torch.relu(h)
        return h  # (N, B, K)


def blobs(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of k Gaussian blobs (std 0.3) on a circle of radius 0.8: (n, 2), (n,)."""
    y = torch.randint(0, k, (n,), generator=gen)
    angle = 2 * math.pi * y.float() / k
    centres = 0.8 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + 0.3 * torch.randn(n, 2, generator=gen), y


def ood_points(n: int, cell: Toy2dCell, data: torch.Tensor, gen: torch.Generator
               ) -> torch.Tensor:
    """Up to n points uniform over [-box, box]^2, none within query_margin of `data`."""
    pts = (torch.rand(4 * n, 2, generator=gen) * 2 - 1) * cell.box
    if cell.query_margin > 0:
        pts = pts[torch.cdist(pts, data).min(dim=1).values > cell.query_margin]
    return pts[:n]


def _fit(model: nn.Module, steps: int, lr: float, loss_fn: Any) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


class Toy2dTarget:
    """The defender: one MLP, or N members routed by the secret hash H(x) mod N."""

    def __init__(self, cell: Toy2dCell, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> None:
        edm = cell.training == "edm"
        self.n = cell.members if edm else 1
        self.model = StackedMLP(self.n, cell.hidden, cell.classes, gen=gen)

        def loss() -> torch.Tensor:
            out = self.model(ood_points(cell.ood_batch, cell, x, gen)) if edm else None
            total, _, _ = edm_loss(self.model(x), y, out, lambda_d=cell.lambda_d if edm else 0)
            return total * self.n  # N * L: each member's CE at full strength (as joint.py)

        _fit(self.model, cell.epochs, cell.lr, loss)
        hash_gen = torch.Generator().manual_seed(1_000_003 * (cell.seed + 1))
        self.hash_net = StackedMLP(1, HASH_WIDTH, self.n * HASH_SUBCLASSES, gen=hash_gen,
                                   bias_std=0.5)

    @torch.no_grad()
    def member(self, q: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B,) index of the member that answers."""
        return self.hash_net(q)[0].argmax(dim=1) % self.n

    @torch.no_grad()
    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, K) the answering member's probabilities."""
        probs = torch.softmax(self.model(q), dim=-1)  # (N, B, K)
        return probs[self.member(q), torch.arange(q.shape[0])]


def train_clone(cell: Toy2dCell, q: torch.Tensor, answers: torch.Tensor,
                gen: torch.Generator) -> StackedMLP:
    clone = StackedMLP(1, cell.hidden, cell.classes, gen=gen)

    def loss() -> torch.Tensor:  # soft-label cross-entropy
        return -(answers * torch.log_softmax(clone(q)[0], dim=-1)).sum(dim=1).mean()

    _fit(clone, cell.clone_epochs, cell.lr, loss)
    return clone


def grid(cell: Toy2dCell) -> torch.Tensor:
    """(grid_size^2, 2) points over the box, row-major, row 0 at y = -box."""
    ticks = torch.linspace(-cell.box, cell.box, cell.grid_size)
    yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


@TASKS.register("toy2d")
class Toy2d(Task):
    Cell = Toy2dCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        gen = torch.Generator().manual_seed(cell.seed)
        x, y = blobs(cell.n_train, cell.classes, gen)
        x_test, y_test = blobs(cell.n_test, cell.classes, gen)
        target = Toy2dTarget(cell, x, y, gen)
        q = ood_points(cell.n_queries, cell, x, gen)
        answers = target(q)  # (Q, K) soft labels
        clone = train_clone(cell, q, answers, gen)
        with torch.no_grad():
            t_pred = target(x_test).argmax(dim=1)
            c_pred = clone(x_test)[0].argmax(dim=1)
            pts = grid(cell)
            c_grid = clone(pts)[0].argmax(dim=1)
        t_acc = (t_pred == y_test).float().mean().item()
        c_acc = (c_pred == y_test).float().mean().item()
        metrics = {"target_accuracy": t_acc, "clone_accuracy": c_acc,
                   "agreement": (c_pred == t_pred).float().mean().item(),
                   "normalized_accuracy": c_acc / t_acc if t_acc > 0 else float("nan"),
                   "queries": float(q.shape[0])}
        show = slice(0, cell.n_show)
        series = {
            "extent": [-cell.box, cell.box, -cell.box, cell.box],
            "target_grid": target(pts).argmax(dim=1).float().tolist(),
            "clone_grid": c_grid.float().tolist(),
            "hash_grid": target.member(pts).float().tolist(),
            "train_x": x[show, 0].tolist(), "train_y": x[show, 1].tolist(),
            "train_label": y[show].float().tolist(),
            "query_x": q[:, 0].tolist(), "query_y": q[:, 1].tolist(),
            "query_label": answers.argmax(dim=1).float().tolist(),
        }
        return CellResult(metrics=metrics, series=series)
