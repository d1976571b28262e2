"""Joint training of the N members on eq. 3, through the one training loop.

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, section 4.1, eq. 3:

    L = E [ 1/N sum_i CE(f_i(x), y) + lambda_D * DivLoss({f_i(x~)}_{i=1..N}) ]

`train_ensemble` runs `stealguard.training.train` on a module whose forward gives all members'
logits (N, B, K), with eq. 3 as the loss and the OOD set as an extra batch stream. That
module has two forms, chosen by the device (`batched=None`):
- on CUDA, `StackedMembers`: the members' parameters stacked along a leading axis N with
  `torch.func.stack_module_state`, and one `vmap` of `functional_call` evaluates all
  members at once (one kernel per layer for the whole ensemble);
- on a CPU, `MemberList`: the members as separate modules, called one after the other in
  the same step. vmap turns each convolution into a grouped one, which the CPU runs far
  slower than N plain ones: five conv3 members cost 10x one model per step vmapped and
  about N x (B + B') / B separately (benchmarks/bench_edm.py, BENCHMARKS.md).
The two compute the same function and the same gradients (up to float rounding).
Each step every member sees the same in-distribution batch x
(B images) and the same OOD batch x~ (B' images), so the diversity term compares the
members on identical inputs (BatchNorm members normalise over both batches together,
each member with its own running statistics). The optimizer (SGD / Adam / Adagrad of
`TrainConfig`) acts element-wise, so one optimizer over the stacked tensors equals N
separate optimizers.

Our choice: each step descends N * L, not L. Both have the same minimiser and the same
ratio lambda_D between the two terms, but with L's 1/N every member's cross-entropy gradient
is N times smaller than when it trains alone, so with SGD a `TrainConfig` would mean an N
times smaller learning rate for an ensemble than for the undefended victim. With N * L,
lambda_D = 0 (the paper's regular ensemble) is exactly N independent trainings, and the
logged "loss" is L itself (eq. 3).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from stealguard.ensemble.diversity import edm_loss
from stealguard.errors import ConfigError, InputError
from stealguard.models import Classifier, Normalize
from stealguard.training import (
    Batch,
    ExtraBatches,
    Forward,
    StepLoss,
    TrainConfig,
    TrainLog,
    resolve_device,
    train,
)


class StackedMembers(nn.Module):
    """N members of one architecture as stacked tensors; `forward(x)` -> (N, B, K) logits.

    The input normalisation buffers (`Normalize` mean / std) are constants equal across
    members, so they are passed once, unbatched: the input then stays unbatched until the
    first layer, which vmap runs as one convolution with N times the filters instead of a
    grouped convolution on N copies of the batch (3x faster on a CPU).
    """

    def __init__(self, members: Sequence[Classifier]) -> None:
        super().__init__()
        check_members(members)
        params, buffers = stack_module_state(list(members))  # name -> (N, ...) tensors
        shared = _shared_buffers(members)
        self.names = list(params)
        # Parameters (not plain tensors) so optimizers and `.to()` see them
        self.stacked = nn.ParameterList([nn.Parameter(params[k]) for k in self.names])
        self.buffer_names = [k for k in buffers if k not in shared]  # stacked (N, ...)
        self.shared_names = [k for k in buffers if k in shared]  # one copy for all members
        for i, k in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[k])
        for i, k in enumerate(self.shared_names):
            self.register_buffer(f"shared_{i}", buffers[k][0].clone())
        self.n = len(members)
        if hasattr(members[0], "num_classes"):  # `train` checks the labels against it
            self.num_classes = int(members[0].num_classes)  # type: ignore[arg-type]
        # a stateless skeleton: functional_call supplies the tensors
        self._skeleton = [copy.deepcopy(members[0]).to("meta")]  # list: not a submodule

    def _tensors(self) -> tuple[dict[str, torch.Tensor], ...]:
        params = dict(zip(self.names, self.stacked))
        buffers = {k: getattr(self, f"buffer_{i}") for i, k in enumerate(self.buffer_names)}
        shared = {k: getattr(self, f"shared_{i}") for i, k in enumerate(self.shared_names)}
        return params, buffers, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) shared by all members -> (N, B, K) logits, one vmapped call."""
        skeleton = self._skeleton[0]

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                s: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(skeleton, (p, {**b, **s}), (x,))

        return vmap(one, in_dims=(0, 0, None))(*self._tensors())

    @torch.no_grad()
    def write_back(self, members: Sequence[nn.Module]) -> None:
        """Copy the stacked tensors into the member modules (member i gets slice i)."""
        params, buffers, shared = self._tensors()
        for i, m in enumerate(members):
            state = {**{k: v[i] for k, v in {**params, **buffers}.items()}, **shared}
            m.load_state_dict(state, strict=True)


class MemberList(nn.Module):
    """N members as separate modules; `forward(x)` -> (N, B, K), one call per member.
    The members are trained in place (no copy to write back)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        check_members(members)
        self.members = nn.ModuleList(members)
        self.n = len(members)
        if hasattr(members[0], "num_classes"):  # `train` checks the labels against it
            self.num_classes = int(members[0].num_classes)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) shared by all members -> (N, B, K)."""
        return torch.stack([m(x) for m in self.members])

    def write_back(self, members: Sequence[nn.Module]) -> None:
        """Nothing to copy: `members` are the trained modules themselves."""


def _shared_buffers(members: Sequence[nn.Module]) -> set[str]:
    """Names of the `Normalize` buffers, when every member holds the same values."""
    names = {f"{mod}.{b}" if mod else b for mod, module in members[0].named_modules()
             if isinstance(module, Normalize) for b in ("mean", "std")}
    states = [dict(m.named_buffers()) for m in members]
    return {k for k in names if all(torch.equal(s[k], states[0][k]) for s in states)}


def check_members(members: Sequence[nn.Module]) -> None:
    """N >= 2 members of one architecture, input shape and class count."""
    if len(members) < 2:
        raise ConfigError(f"an EDM ensemble needs N >= 2 members, got {len(members)}")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        for attr in ("arch", "input_shape", "num_classes"):
            if getattr(m, attr, None) != getattr(first, attr, None):
                raise ConfigError(f"member {i} has {attr} {getattr(m, attr, None)!r}, member 0 "
                                  f"has {getattr(first, attr, None)!r}; members must match")


EnsembleLog = TrainLog  # epochs carry "loss" (eq. 3), "ce" and "div"


def _check_data(members: Sequence[Classifier], images: torch.Tensor, labels: torch.Tensor,
                ood_images: torch.Tensor | None, lambda_d: float) -> None:
    shape = tuple(members[0].input_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != shape or labels.shape != images.shape[:1]:
        raise InputError(f"train_ensemble expects images (N, {', '.join(map(str, shape))}) and "
                         f"as many labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if lambda_d < 0:
        raise ConfigError(f"lambda_D must be >= 0, got {lambda_d}")
    if lambda_d > 0:
        if ood_images is None or len(ood_images) == 0:
            raise ConfigError("lambda_D > 0 needs an out-of-distribution image set")
        if tuple(ood_images.shape[1:]) != shape:
            raise ConfigError(f"the OOD images have shape {tuple(ood_images.shape[1:])}, the "
                              f"members take {shape}; use an OOD set of the victim's image shape")


def edm_objective(lambda_d: float, members: int) -> Callable[[Forward, Batch], StepLoss]:
    """Eq. 3 as a loss for `train`: the model's forward gives (N, B, K); descends N * L."""

    def loss(forward: Forward, batch: Batch) -> StepLoss:
        xo = batch.extra.get("ood")  # (B', C, H, W) or None
        b = batch.x.shape[0]
        x = batch.x if xo is None else torch.cat([batch.x, xo])  # one pass over both
        logits = forward(x)  # (N, B + B', K)
        out = logits[:, b:] if xo is not None else None
        value, ce, div = edm_loss(logits[:, :b], batch.y, out, lambda_d=lambda_d)
        return StepLoss(value * members, {"loss": value.detach(), "ce": ce, "div": div})

    return loss


def train_ensemble(
    members: Sequence[Classifier], images: torch.Tensor, labels: torch.Tensor,
    ood_images: torch.Tensor | None, *, lambda_d: float, config: TrainConfig,
    ood_batch_size: int | None = None, device: str | torch.device | None = "cpu",
    progress: bool = True, desc: str = "edm", batched: bool | None = None,
    channels_last: bool = False,
) -> TrainLog:
    """Train `members` in place on eq. 3. images (M, C, H, W) uint8, labels (M,) int64,
    ood_images (M', C, H, W) uint8 (unused when lambda_d == 0). ood_batch_size defaults to
    config.batch_size; the OOD set is cycled, reshuffled each pass. batched: run the members
    as one vmapped `StackedMembers` (True) or as a `MemberList` (False); None: vmapped on
    CUDA, separate on a CPU (see the module docstring). channels_last: as in `train`."""
    check_members(members)
    _check_data(members, images, labels, ood_images, lambda_d)
    dev = resolve_device(device)
    extras = ({"ood": ExtraBatches(ood_images, batch_size=ood_batch_size)}
              if lambda_d > 0 and ood_images is not None else {})
    if batched is None:
        batched = dev.type == "cuda"
    stack: StackedMembers | MemberList = (StackedMembers if batched else MemberList)(members)
    log = train(stack, images, labels.long(), config=config, device=dev, progress=progress,
                desc=desc, loss=edm_objective(lambda_d, len(members)), extras=extras,
                channels_last=channels_last)
    stack.write_back(members)
    for m in members:
        m.eval()
    return log
