"""`task: steal`: attack a (defended) victim through a black box and measure the clone.

The cell of most tables in both papers (EDM Tables 2-7, MAD Figures 3-5, 8, 9, A2, A6):

    victim    how the target is trained (standard, edm, ensemble, dp_sgd, outlier_exposure)
    defense   an output defense on top of it ({name, params}; `none` by default)
    attack    a registered attack, its data (`queries`, read from `queries_split`), `budget`
    options   the attacker's options (labels soft/hard, clone arch, nquery, ...)
    clone     the clone's training (TrainConfig)

Metrics: clone_accuracy, normalized_accuracy (acc(C) / acc(V), the papers' "0.52x"),
agreement, victim_accuracy (the target's own, undefended), defender_accuracy (with the
defense on), and with a defense the mean/std L1, L2 and KL perturbation and the fraction of
changed argmaxes on the victim's test set (MAD paper's utility axes). All percentages are
fractions in [0, 1].

Determinism: the victim's training, the attack and the clone are seeded, and a keyed
defense's secret is derived from the cell's seed, so the same cell gives the same numbers
in any process (the local and the Ray engines store identical rows).
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field, field_validator, model_validator

from stealguard.attacks import ATTACKS, AttackConfig, attack_params_class
from stealguard.defenses import Defense, DefenseConfig
from stealguard.defenses.metrics import defense_metrics
from stealguard.pipeline import steal, test_set_for
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.victims import DatasetName, VictimConfig
from stealguard.training import TrainConfig


def defense_key(seed: int) -> bytes:
    """The secret of a keyed defense in an experiment: fixed by the cell's seed."""
    return hashlib.sha256(f"stealguard-reproduce-defense-{seed}".encode()).digest()


def build_cell_defense(cfg: DefenseConfig, victim: Any, *, seed: int,
                       components: dict[str, Any]) -> Defense | None:
    """The cell's defense on `victim.model` (None for `none`), its secret fixed by `seed`."""
    if cfg.is_none:
        return None
    return cfg.build(victim.model, key=defense_key(seed), components=components)


class StealCell(CellBase):
    """One attack on one (defended) victim. The attack goes through one `AttackConfig`:
    `attack` (its registered name), `queries`/`queries_split` (its data), `options` (its typed
    Params: labels, arch, nquery, ..., and for the Jacobian family preset, seed_size,
    rounds, step, round_config, ...) and `clone` (the returned clone's training)."""

    victim: VictimConfig
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    attack: str = "knockoff"
    queries: DatasetName | None = Field(None, description="the attacker's images: the "
                                        "surrogate set, or the in-distribution images the "
                                        "Jacobian family draws its seeds from (None: a "
                                        "data-free attack)")
    queries_split: str = "train"
    budget: int = Field(ge=1)
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="the attack's Params (see `stealguard attacks`)")
    clone: TrainConfig | None = Field(None, description="the returned clone's training (None: "
                                      "the attack's); its seed is the cell's")
    test_subset: int | None = Field(None, ge=1, description="evaluate on a seeded test subset")

    @model_validator(mode="before")
    @classmethod
    def _legacy_fields(cls, data: Any) -> Any:
        """Cells stored before the attacks had typed Params carried `preset`, `seed_size` and
        `jacobian` beside `options`: they are attack params now (a `preset` on an attack
        without one was ignored then, and is dropped)."""
        if not isinstance(data, dict) or not {"preset", "seed_size", "jacobian"} & set(data):
            return data
        data = dict(data)
        moved = dict(data.pop("jacobian", None) or {})
        if moved.get("rounds", 0) is None:
            moved["rounds"] = "budget"
        if data.get("seed_size") is not None:
            moved["seed_size"] = data["seed_size"]
        data.pop("seed_size", None)
        preset = data.pop("preset", None)
        fields = attack_params_class(data.get("attack", "knockoff")).model_fields
        if preset is not None and "preset" in fields:
            moved["preset"] = preset
        data["options"] = {**moved, **dict(data.get("options") or {})}
        return data

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, v: str) -> str:
        ATTACKS.get(v)
        return v

    @model_validator(mode="after")
    def _options(self) -> StealCell:
        self.attack_config()  # names a bad field
        return self

    def datasets(self) -> list[str]:
        return [*self.victim.datasets(), *([self.queries] if self.queries else [])]

    def attack_config(self) -> AttackConfig:
        """The cell's attack as one AttackConfig (the clone's seed and the attack's are the
        cell's; the clone's architecture defaults to the victim's)."""
        params: dict[str, Any] = {"seed": self.seed, "arch": self.victim.arch, **self.options}
        if self.clone is not None:
            params["clone"] = self.clone.model_copy(update={"seed": self.seed})
        data_free = getattr(ATTACKS.get(self.attack), "data_free", False)
        if data_free != (self.queries is None):
            raise ValueError(f"attack {self.attack!r} is data-free: give it no queries" if data_free
                             else f"attack {self.attack!r} needs queries (the attacker's images)")
        data = None if data_free else f"{self.queries}@{self.queries_split}"
        return AttackConfig.parse({"name": self.attack, "params": params, "data": data})


@TASKS.register("steal")
class Steal(Task):
    Cell = StealCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        tv = ctx.victim(cell.victim)
        victim = tv.victim
        defense = build_cell_defense(cell.defense, victim, seed=cell.seed,
                                     components=tv.components)
        r = steal(victim, cell.attack_config(), budget=cell.budget, defense=defense,
                  device=ctx.device, data_root=ctx.data_root, progress=ctx.progress)
        metrics = {k: float(r[k]) for k in ("clone_accuracy", "normalized_accuracy",
                                             "agreement", "victim_accuracy", "queries")}
        metrics["defender_accuracy"] = victim.test_accuracy
        if defense is not None:
            test = test_set_for(victim, data_root=ctx.data_root)
            if cell.test_subset:
                test = test.subset(cell.test_subset, seed=cell.seed)
            dm = defense_metrics(victim.model, defense, test.images, test.labels,
                                 device=ctx.device)
            metrics["defender_accuracy"] = dm["accuracy"]
            metrics.update({k: dm[k] for k in dm if k.endswith(("_mean", "_std"))})
            metrics["argmax_changed"] = dm["argmax_changed"]
        metrics.update({k: float(v) for k, v in tv.info.items()
                        if isinstance(v, int | float) and k in ("hash_accuracy", "dp_epsilon",
                                                                 "surrogate_accuracy")})
        return CellResult(metrics=metrics)
