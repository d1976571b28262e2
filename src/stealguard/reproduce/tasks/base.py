"""What one cell of an experiment spec measures: a registered task.

A spec names one task (`task: steal`, `task: coherence`, ...). Every cell of its grid is
validated by the task's `Cell` model (unknown fields refused, so a typo names the field)
and measured by `run(cell, ctx)`, which returns a `CellResult`:

    metrics  {name: float}        the numbers tables show (clone accuracy, L1, ...)
    series   {name: list[float]}  the arrays plots draw (coherence values, angles, ...)

    @TASKS.register("coherence")
    class Coherence(Task):
        class Cell(CellBase):
            victim: VictimConfig
            queries: str
        @staticmethod
        def run(cell, ctx) -> CellResult: ...

`RunContext` gives a task what it shares with the other cells of a run: the device, the
data root, and the cache of trained victims (`ctx.victim(cfg)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from stealguard.registry import Registry
from stealguard.reproduce.victims import TrainedVictim, VictimCache, VictimConfig


class CellBase(BaseModel):
    """Fields every cell has. Subclasses add the task's own; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0

    def datasets(self) -> list[str]:
        """Every dataset the cell reads; a cell whose data is missing is listed, not run."""
        out: list[str] = []
        for name, value in self:
            if isinstance(value, VictimConfig):
                out += value.datasets()
            elif name in self.dataset_fields and isinstance(value, str):
                out.append(value)
        return out

    dataset_fields: ClassVar[tuple[str, ...]] = ("queries",)


@dataclass
class CellResult:
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RunContext:
    device: torch.device
    artifacts: Path
    data_root: str | Path | None = None
    progress: bool = False
    victims: VictimCache = field(init=False)

    def __post_init__(self) -> None:
        self.victims = VictimCache(self.artifacts)

    def victim(self, cfg: VictimConfig) -> TrainedVictim:
        return self.victims.get(cfg, device=self.device, data_root=self.data_root,
                                progress=self.progress)


class Task:
    """A registered measurement: a `Cell` model and `run`."""

    Cell: ClassVar[type[CellBase]] = CellBase

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:  # pragma: no cover - abstract
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task")
