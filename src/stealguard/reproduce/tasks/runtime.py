"""`task: runtime`: milliseconds per prediction of the undefended and the defended victim.

Orekondy, Schiele & Fritz, "Prediction Poisoning", ICLR 2020, appendix E.2 and Table A3:
mean and standard deviation of the time of one prediction, undefended and with MAD, over
10K predictions (one image per prediction) on an Nvidia Tesla V100. Absolute times depend
on the machine; the ratio defended / undefended, measured in one run, is what carries over.

    victim       VictimConfig (the model answering)
    defense      DefenseConfig ({name, params}; the defended side)
    n            predictions timed on each side (paper: 10K), images of the victim's test
                 split (a seeded subset; cycled if the split is smaller)
    batch_size   images per prediction call (paper: 1)
    warmup       untimed calls on each side first (allocations, lazy initialisation)

Both sides answer through a `LocalBlackBox` (validation, forward pass, defense, output on the
CPU: what a caller waits for), interleaved call by call on the same images, so a change in
machine load hits both alike. Each call is timed with `time.perf_counter`; the copy of the
answer to the CPU ends the call, so a CUDA run is timed to completion.

Metrics (per image, milliseconds): undefended_ms_mean, undefended_ms_std, defended_ms_mean,
defended_ms_std, and ratio = defended_ms_mean / undefended_ms_mean.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from stealguard.blackbox import BlackBox, LocalBlackBox
from stealguard.defenses import DefenseConfig
from stealguard.pipeline import test_set_for
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.tasks.steal import build_cell_defense
from stealguard.reproduce.victims import VictimConfig
from stealguard.training import to_float_images


class RuntimeCell(CellBase):
    victim: VictimConfig
    defense: DefenseConfig
    n: int = Field(10_000, ge=1, description="predictions timed per side (paper: 10K)")
    batch_size: int = Field(1, ge=1, description="images per prediction (paper: 1)")
    warmup: int = Field(20, ge=0, description="untimed calls per side before timing")


def timing_images(images: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """n images (N, C, H, W) -> (n, C, H, W): a seeded permutation, cycled if N < n."""
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    reps = -(-n // images.shape[0])  # ceil
    return images[perm.repeat(reps)[:n]]


def time_interleaved(sides: dict[str, BlackBox], x: torch.Tensor, *, batch_size: int,
                     warmup: int) -> dict[str, torch.Tensor]:
    """For each batch of x, one timed query per side in turn -> {side: ms per image (B,)}."""
    batches = list(x.split(batch_size))
    for xb in batches[:warmup]:
        for bb in sides.values():
            bb.query(xb)
    ms: dict[str, list[float]] = {name: [] for name in sides}
    for xb in batches:
        for name, bb in sides.items():
            t0 = time.perf_counter()
            bb.query(xb)
            ms[name].append((time.perf_counter() - t0) * 1000.0 / xb.shape[0])
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in ms.items()}


@TASKS.register("runtime")
class Runtime(Task):
    Cell = RuntimeCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        tv = ctx.victim(cell.victim)
        victim = tv.victim
        defense = build_cell_defense(cell.defense, victim, seed=cell.seed,
                                     components=tv.components)
        test = test_set_for(victim, data_root=ctx.data_root)
        x = to_float_images(timing_images(test.images, cell.n, seed=cell.seed))  # (n, C, H, W)
        sides: dict[str, BlackBox] = {
            "undefended": LocalBlackBox(victim.model, device=ctx.device),
            "defended": LocalBlackBox(victim.model, defense=defense, device=ctx.device),
        }
        ms = time_interleaved(sides, x, batch_size=cell.batch_size, warmup=cell.warmup)
        metrics = {}
        for name, v in ms.items():
            metrics[f"{name}_ms_mean"] = float(v.mean())
            metrics[f"{name}_ms_std"] = float(v.std(unbiased=False))
        metrics["ratio"] = metrics["defended_ms_mean"] / metrics["undefended_ms_mean"]
        return CellResult(metrics=metrics)
