"""The attack interface and the one clone-training path every attack shares.

An attack takes a black box and a query budget and returns an `AttackResult`: the clone,
the transfer set it was trained on (inputs and the black box's answers), the number of
queries it spent, and a log. Attacks only ever see the victim through `BlackBox.query`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stealguard.blackbox import BlackBox
from stealguard.errors import ConfigError
from stealguard.models import Classifier, build_model
from stealguard.registry import Registry
from stealguard.training import TrainConfig, TrainLog, train

LabelMode = Literal["soft", "hard"]


@dataclass
class AttackResult:
    clone: Classifier
    transfer_x: torch.Tensor  # (Q, C, H, W) uint8 or float: the images queried
    transfer_y: torch.Tensor  # (Q, K) the black box's answers
    queries: int
    log: list[dict[str, Any]] = field(default_factory=list)
    queries_per_row: int = 1  # queries behind each transfer-set row (nquery in "average" mode)


class Attack(ABC):
    """Subclasses implement `run`; `__call__` checks the budget accounting around it."""

    @abstractmethod
    def run(self, blackbox: BlackBox, budget: int) -> AttackResult: ...

    def __call__(self, blackbox: BlackBox, budget: int) -> AttackResult:
        if budget < 1:
            raise ConfigError(f"query budget must be >= 1, got {budget}")
        before = blackbox.queries_used
        result = self.run(blackbox, budget)
        spent = blackbox.queries_used - before
        if spent != result.queries or spent > budget:  # an attack that lies about its count is a bug
            raise RuntimeError(f"attack reported {result.queries} queries, black box counted "
                               f"{spent} (budget {budget})")
        return result


def query_all(blackbox: BlackBox, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Query `images` (N, C, H, W) in batches -> (N, K) answers (CPU float)."""
    outs = [blackbox.query(xb) for xb in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, blackbox.num_classes)


def answers_to_targets(answers: torch.Tensor, labels: str) -> torch.Tensor:
    """soft: the answered probability vectors (N, K); hard: their argmax (N,)."""
    if labels == "soft":
        return answers.float()
    if labels == "hard":
        return answers.argmax(1)
    raise ConfigError(f"unknown label mode {labels!r}; valid: soft, hard")


def train_clone(
    images: torch.Tensor, answers: torch.Tensor, *, labels: str, arch: str,
    input_shape: tuple[int, int, int], num_classes: int, mean: tuple[float, ...],
    std: tuple[float, ...], config: TrainConfig, device: str | torch.device | None = "cpu",
    progress: bool = False, clone: Classifier | None = None,
) -> tuple[Classifier, TrainLog]:
    """Build (or continue) a clone and train it on the transfer set. Shared by all attacks."""
    c, h, _ = input_shape
    if clone is None:
        torch.manual_seed(config.seed)
        clone = build_model(arch, in_channels=c, image_size=h, num_classes=num_classes,
                            mean=mean, std=std)
    targets = answers_to_targets(answers, labels)
    log = train(clone, images, targets, config=config, device=device, progress=progress,
                desc="clone")
    return clone, log


AttackFactory = Callable[..., Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")
