"""`task: coherence`: how alike the ensemble members answer the attacker's queries (EDM Fig. 5).

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, sec. 5.3 and Figure 5: the CDF of eq. 1 over the KnockoffNets queries,

    Coherence({y_i}) = max_{a != b} CS(y_a, y_b),   y_i = f_i(x) the N members' probabilities

for a regular ensemble (`training: ensemble`, lambda_D = 0) and EDM (`training: edm`). EDM is
trained to disagree on its auxiliary OOD set; the figure asks whether that carries over to
the attacker's (different) OOD queries.

    victim         VictimConfig, training edm or ensemble
    queries        the attacker's dataset, read from `queries_split`
    n              a seeded subset of that many queries (all when None; paper: the 50K budget)

Metrics: coherence_median, coherence_mean, frac_below_half (fraction of queries with
coherence < 0.5), victim_accuracy. Series: "coherence", the sorted values, thinned to at most
`max_series` evenly spaced order statistics (the empirical quantiles; the CDF of the plot
is F = (i + 1) / len), so a row stays small whatever n is.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from stealguard.data import load_dataset
from stealguard.data.augment import to_shape
from stealguard.ensemble import EDMPredictor, coherence_on
from stealguard.errors import ConfigError
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.victims import DatasetName, VictimConfig

ENSEMBLE_TRAININGS = ("edm", "ensemble")


def thin_sorted(values: torch.Tensor, cap: int) -> list[float]:
    """Sorted values (Q,) -> at most `cap` evenly spaced order statistics, both ends kept."""
    v = values.detach().flatten().double().sort().values
    if v.numel() > cap:
        idx = torch.linspace(0, v.numel() - 1, cap, dtype=torch.float64).round().long()
        v = v[idx]
    return v.tolist()


class CoherenceCell(CellBase):
    victim: VictimConfig
    queries: DatasetName
    queries_split: str = "train"
    n: int | None = Field(None, ge=1, description="seeded subset of the queries (None: all)")
    max_series: int = Field(2000, ge=2, description="cap on the stored sorted values")

    @field_validator("victim")
    @classmethod
    def _ensemble(cls, v: VictimConfig) -> VictimConfig:
        if v.training not in ENSEMBLE_TRAININGS:
            raise ConfigError(f"coherence needs an ensemble victim (training: "
                              f"{' or '.join(ENSEMBLE_TRAININGS)}), got {v.training!r}")
        return v


@TASKS.register("coherence")
class Coherence(Task):
    Cell = CoherenceCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        tv = ctx.victim(cell.victim)
        edm = tv.victim.model
        if not isinstance(edm, EDMPredictor):
            raise ConfigError(f"coherence: victim {cell.victim.key()} is not an ensemble")
        ds = load_dataset(cell.queries, cell.queries_split, data_root=ctx.data_root)
        if cell.n is not None:
            ds = ds.subset(cell.n, seed=cell.seed)
        c, h, _ = edm.input_shape
        images = to_shape(ds.images, c, h)  # (Q, C, H, W) uint8, as KnockoffNets sends them
        values = coherence_on(edm, images, device=ctx.device)  # (Q,)
        edm.cpu()
        return CellResult(
            metrics={"coherence_median": float(values.median()),
                     "coherence_mean": float(values.mean()),
                     "frac_below_half": float((values < 0.5).double().mean()),
                     "victim_accuracy": float(tv.victim.test_accuracy),
                     "queries": float(values.numel())},
            series={"coherence": thin_sorted(values, cell.max_series)},
        )
