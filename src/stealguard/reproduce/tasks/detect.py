"""`task: detect`: one client's query stream against the stealing detectors (issue #18).

A cell is one client of a victim, watched by a `Monitor` (stealguard.detect) under `flag`:

    client: attack      a registered attack, run through a LocalBlackBox until `budget`
                        queries (its clone is not trained: the stream is what is measured)
            evasive     the same attack with benign queries mixed in (PRADA section VII's
                        evasion): before each attack batch of b images, b * r / (1 - r)
                        images of the benign pool, r = `benign_ratio`, on the same key
            benign_test the victim's test split (minus the detector's held-out half) in
                        random order, split among `keys` keys
            benign_own  one key sending natural in-distribution images of its own: the
                        victim's train-split images it was not trained on, in random order

Data: the victim's test split is permuted (seeded); its first `reference_size` images are
the defender's held-out data (the shift detector's reference and calibration halves); the
rest is the benign pool (the benign_test client, the Jacobian family's seed images, the
evasive attacker's benign queries).

Metrics, per detector d: d_detected (1 if d flagged the key; for benign_test the fraction
of keys flagged), d_queries (the key's query number at the first alarm; absent if none),
d_test_alarms (the fraction of the detector's tests that crossed its threshold: the
per-test false-alarm rate on benign clients). Also `queries`, the key's stream length
(which stops early once every detector has fired).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stealguard.attacks import ATTACKS, attack_params_class, build_attack, validate_attack
from stealguard.blackbox import BlackBox, LocalBlackBox
from stealguard.data import ImageDataset, load_dataset
from stealguard.data.augment import to_shape
from stealguard.detect import DETECTORS, Monitor, build_monitor
from stealguard.detect.base import validate_detector_params
from stealguard.pipeline import test_set_for
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task
from stealguard.reproduce.victims import DatasetName, VictimConfig
from stealguard.training import TrainConfig


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> DetectorConfig:
        validate_detector_params(self.name, DETECTORS.get(self.name).Params, self.params)
        return self


class DetectCell(CellBase):
    victim: VictimConfig
    detectors: list[DetectorConfig] = Field(default_factory=lambda: [
        DetectorConfig(name="prada"), DetectorConfig(name="shift")])
    client: Literal["attack", "evasive", "benign_test", "benign_own"]
    attack: str | None = None
    queries: DatasetName | None = Field(None, description="the surrogate set (knockoff, "
                                        "adaptive_averaging); the Jacobian family's seed "
                                        "images come from the benign pool")
    queries_split: str = "train"
    budget: int = Field(ge=1, description="attack queries (attack, evasive) or the whole "
                        "stream (benign clients)")
    benign_ratio: float = Field(0.0, ge=0, lt=1)
    keys: int = Field(1, ge=1)
    reference_size: int = Field(5000, ge=100)
    seed_size: int | None = Field(None, ge=1, description="the Jacobian family's seed "
                                  "images (ignored by other attacks)")
    jacobian: dict[str, Any] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    clone: TrainConfig | None = None

    @model_validator(mode="after")
    def _client(self) -> DetectCell:
        attacking = self.client in ("attack", "evasive")
        if attacking != (self.attack is not None):
            raise ValueError("attack is required for client attack / evasive, and only there")
        if self.attack is not None:
            ATTACKS.get(self.attack)
            validate_attack(self.attack, attack_params(self)[0])  # names a bad field
        if (self.client == "evasive") != (self.benign_ratio > 0):
            raise ValueError("benign_ratio > 0 is for client evasive, and required there")
        return self


class _Done(Exception):
    """The stream is over (budget spent, or every detector has fired)."""


class _Stream(BlackBox):
    """The attack's black box: counts its queries, mixes benign ones in (evasive), and ends
    the run once the budget is spent or every detector has fired."""

    def __init__(self, inner: LocalBlackBox, *, budget: int, benign: torch.Tensor | None,
                 ratio: float) -> None:
        super().__init__(budget=budget)
        self.inner, self.benign, self.ratio, self._next = inner, benign, ratio, 0
        self.attack_rows = 0  # answered attack images (queries_used is rolled back by _Done)
        self.input_shape, self.num_classes = inner.input_shape, inner.num_classes

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        if self.benign is not None and self.ratio > 0:
            m = round(len(x) * self.ratio / (1 - self.ratio))
            idx = (torch.arange(m) + self._next) % len(self.benign)
            self._next += m
            for xb in self.benign[idx].split(256):
                self.inner.query(xb)
                self._check()
        out = self.inner.query(x)
        self.attack_rows += len(x)
        self._check(final=self.queries_used >= (self.budget or 0))
        return out

    def _check(self, final: bool = False) -> None:
        monitor = self.inner.monitor
        assert monitor is not None
        if final or len(monitor.alarms(self.inner.client)) == len(monitor.detectors):
            raise _Done


def _stream_metrics(monitor: Monitor, keys: list[str], queries: int) -> dict[str, float]:
    out: dict[str, float] = {"queries": float(queries)}
    for name in monitor.detectors:
        states = [monitor.state(k, name) for k in keys]
        alarmed = [s.alarm_at for s in states if s.alarm_at is not None]
        out[f"{name}_detected"] = len(alarmed) / len(keys)
        if alarmed:
            out[f"{name}_queries"] = float(min(alarmed))
        tests = sum(s.tests for s in states)
        if tests:
            out[f"{name}_test_alarms"] = sum(s.tests_alarmed for s in states) / tests
    return out


@TASKS.register("detect")
class Detect(Task):
    Cell = DetectCell

    @staticmethod
    def run(cell: Any, ctx: RunContext) -> CellResult:
        tv = ctx.victim(cell.victim)
        model = tv.victim.model.to(ctx.device).eval()
        test = test_set_for(tv.victim, data_root=ctx.data_root).subset(seed=cell.seed)
        if len(test) <= cell.reference_size:
            raise ValueError(f"reference_size {cell.reference_size} leaves no benign pool in "
                             f"the {len(test)} test images")
        reference = test.images[: cell.reference_size]
        pool = ImageDataset(test.name, "test", test.images[cell.reference_size:],
                            test.labels[cell.reference_size:], test.classes, test.mean,
                            test.std)
        monitor = build_monitor([(d.name, d.params) for d in cell.detectors], model=model,
                                reference=reference, device=ctx.device)
        if cell.client in ("attack", "evasive"):
            return CellResult(metrics=_attack(cell, ctx, model, monitor, pool))
        if cell.client == "benign_test":
            streams = list(pool.float_images()[: cell.budget].chunk(cell.keys))
        else:
            streams = [_own_images(cell, ctx, model)[: cell.budget]]
        keys = [f"benign{i}" for i in range(len(streams))]
        for key, xs in zip(keys, streams):
            bb = LocalBlackBox(model, monitor=monitor, client=key, device=ctx.device)
            for xb in xs.split(100):
                bb.query(xb)
        return CellResult(metrics=_stream_metrics(monitor, keys,
                                                  sum(len(s) for s in streams)))


def attack_params(cell: Any) -> tuple[dict[str, Any], bool]:
    """The cell's attack Params fields, and whether the attack is of the Jacobian family
    (its data is the seed pool, not a surrogate set)."""
    fields = attack_params_class(cell.attack).model_fields
    jacobian_family = "rounds" in fields
    params: dict[str, Any] = {"seed": cell.seed, "arch": cell.victim.arch, **cell.options}
    if cell.clone is not None:
        params["clone"] = cell.clone.model_copy(update={"seed": cell.seed})
    jac = dict(cell.jacobian or {})
    if cell.seed_size is not None and jacobian_family:
        jac["seed_size"] = cell.seed_size
    if jac and not jacobian_family:
        raise ValueError(f"jacobian is for the Jacobian family, not attack {cell.attack!r}")
    return {**params, **jac}, jacobian_family


def _attack(cell: Any, ctx: RunContext, model: Any, monitor: Monitor,
            pool: ImageDataset) -> dict[str, float]:
    params, jacobian_family = attack_params(cell)
    if jacobian_family:
        data: ImageDataset | None = pool
    elif cell.queries is not None:
        data = load_dataset(cell.queries, cell.queries_split, data_root=ctx.data_root)
    else:
        data = None  # a data-free attack
    atk = build_attack(cell.attack, data, params, device=ctx.device)
    inner = LocalBlackBox(model, monitor=monitor, client="attacker", device=ctx.device)
    benign = pool.float_images() if cell.client == "evasive" else None
    stream = _Stream(inner, budget=cell.budget, benign=benign, ratio=cell.benign_ratio)
    try:
        atk(stream, cell.budget)
    except _Done:
        pass
    out = _stream_metrics(monitor, ["attacker"], inner.queries_used)
    out["attack_queries"] = float(stream.attack_rows)
    return out


def _own_images(cell: Any, ctx: RunContext, model: Any) -> torch.Tensor:
    """The victim's train-split images it did not train on (seeded order)."""
    ds = load_dataset(cell.victim.dataset, "train", data_root=ctx.data_root)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(
        cell.victim.train.seed))
    unseen = idx[cell.victim.subset:] if cell.victim.subset else idx[:0]
    if len(unseen) == 0:
        raise ValueError("benign_own needs a victim trained on a subset (victim.subset): its "
                         "other train images are the client's own")
    unseen = unseen[torch.randperm(len(unseen), generator=torch.Generator().manual_seed(
        cell.seed + 1))]
    images = ds.images[unseen[: cell.budget]]
    c, h, _ = model.input_shape
    if tuple(images.shape[1:]) != tuple(model.input_shape):
        images = to_shape(images, c, h)
    return images.float().div_(255.0)
