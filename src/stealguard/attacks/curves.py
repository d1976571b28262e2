"""Clone accuracy versus query budget.

The attack runs once, at the largest budget B_max, and its transfer set is kept in query order.
For each budget B a fresh clone (same architecture, normalisation, labels and training config)
is trained on the prefix of the transfer set that the first B queries bought:

    D_B = D_transfer[: B // q],   q = queries per row (nquery in "average" mode, else 1)

No training is carried from one budget to the next. For KnockoffNets and the Jacobian attacks
the prefix is exactly what the attack would have queried with budget B (same seed), so one run
of queries serves the whole curve.

    points = accuracy_vs_budget(attack, blackbox, [1_000, 10_000, 50_000],
                                test_images=test.images, test_labels=test.labels, victim=victim)
    # [{"budget": 1000, "queries": 1000, "rows": 1000, "clone_accuracy": ..., ...}, ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stealguard.attacks.base import Attack, train_clone
from stealguard.blackbox import BlackBox
from stealguard.errors import ConfigError
from stealguard.metrics import clone_metrics
from stealguard.models import Classifier
from stealguard.training import TrainConfig, accuracy


def accuracy_vs_budget(
    attack: Attack, blackbox: BlackBox, budgets: Sequence[int], *, test_images: torch.Tensor,
    test_labels: torch.Tensor, victim: nn.Module | None = None,
    config: TrainConfig | None = None, labels: str | None = None,
    device: str | torch.device | None = "cpu", progress: bool = False,
) -> list[dict[str, Any]]:
    """One point per budget (ascending): budget, queries and rows used, and the fresh clone's
    test accuracy (plus agreement and normalised accuracy when `victim` is given).

    config / labels default to the attack's own (`attack.clone_config`, `attack.options.labels`).
    """
    budgets = _checked_budgets(budgets, blackbox)
    config = config or getattr(attack, "clone_config", None)
    options = getattr(attack, "options", None)
    labels = labels or getattr(options, "labels", None)
    if config is None or labels is None:
        raise ConfigError(f"{type(attack).__name__} has no clone_config / options.labels; "
                          "pass config= and labels=")
    result = attack(blackbox, budgets[-1])
    points = []
    for budget in budgets:
        rows = min(budget // result.queries_per_row, result.transfer_x.shape[0])
        if rows == 0:
            raise ConfigError(f"budget {budget} buys no transfer-set row "
                              f"({result.queries_per_row} queries per row)")
        clone = _fresh_clone(result.clone, result.transfer_x[:rows], result.transfer_y[:rows],
                             blackbox, labels=labels, config=config, device=device,
                             progress=progress)
        points.append({"budget": budget, "queries": rows * result.queries_per_row, "rows": rows,
                       **_evaluate(clone, victim, test_images, test_labels, device)})
    return points


def _checked_budgets(budgets: Sequence[int], blackbox: BlackBox) -> list[int]:
    out = sorted({int(b) for b in budgets})
    if not out or out[0] < 1:
        raise ConfigError(f"budgets must be a non-empty list of integers >= 1, got {list(budgets)}")
    if blackbox.remaining is not None and out[-1] > blackbox.remaining:
        raise ConfigError(f"largest budget {out[-1]} exceeds the black box's remaining "
                          f"{blackbox.remaining} queries")
    return out


def _fresh_clone(template: Classifier, x: torch.Tensor, y: torch.Tensor, blackbox: BlackBox, *,
                 labels: str, config: TrainConfig, device: str | torch.device | None,
                 progress: bool) -> Classifier:
    """A new clone like `template` (arch, normalisation) trained from scratch on (x, y)."""
    norm = template.normalize
    mean = tuple(torch.as_tensor(norm.mean).flatten().tolist())
    std = tuple(torch.as_tensor(norm.std).flatten().tolist())
    clone, _ = train_clone(x, y, labels=labels, arch=template.arch,
                           input_shape=blackbox.input_shape, num_classes=blackbox.num_classes,
                           mean=mean, std=std, config=config, device=device, progress=progress)
    return clone


def _evaluate(clone: Classifier, victim: nn.Module | None, images: torch.Tensor,
              labels: torch.Tensor, device: str | torch.device | None) -> dict[str, float]:
    if victim is None:
        return {"clone_accuracy": accuracy(clone, images, labels, device=device)}
    return clone_metrics(clone, victim, images, labels, device=device)
