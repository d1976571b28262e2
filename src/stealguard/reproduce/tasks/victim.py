"""`task: victim`: the test accuracy of a trained victim, with no attack and no defense.

The target models' own numbers: EDM paper, Table 1 ("Datasets, model architecture and
accuracies of the target models", undefended vs EDM), and the Acc(F_V) column of MAD paper,
Table 1. The victim is trained (or loaded from the cache) exactly as the steal cells of the
same config get it, so this table and the attack tables describe the same models.

    victim    VictimConfig (standard, edm, ensemble, dp_sgd, outlier_exposure)

Metrics: victim_accuracy (test accuracy of the final model on the dataset's test split, a
fraction in [0, 1]; an EDM answers each image with the member its hash picks), and where
the training reports them: hash_accuracy (EDM: the secret hash network's held-out accuracy
on its hash task) and dp_epsilon (DP-SGD: the privacy spent at the config's delta).
"""

from __future__ import annotations

import math
from typing import Any

from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.victims import VictimConfig

INFO_METRICS = ("hash_accuracy", "dp_epsilon")


class VictimCell(CellBase):
    victim: VictimConfig


@TASKS.register("victim")
class VictimAccuracy(Task):
    Cell = VictimCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        tv = ctx.victim(cell.victim)
        metrics = {"victim_accuracy": float(tv.victim.test_accuracy)}
        for k in INFO_METRICS:
            v = tv.info.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                metrics[k] = float(v)
        return CellResult(metrics=metrics)
