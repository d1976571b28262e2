"""Run a spec: cells -> (engine) -> run store -> table, CSV and plots.

    report = reproduce("edm-table3", scale="quick", results="results", device="cpu")

Steps:
1. Load and validate the spec and every cell of the scale (bad input fails here, before
   anything runs).
2. Cells whose data is missing (a dataset not under the data root) are listed as such and
   skipped; they run when the data is there.
3. Cells already in the store are skipped (resume). The victims the remaining cells need
   are trained first, one job per distinct victim, and cached as artifacts; then every cell
   runs. Each finished cell is written to the store in one transaction.
4. The table (Markdown + CSV) and plots are written from the store's rows for the spec's
   cells, so they are the same whether the cells ran now, earlier, or on another machine.

Engines: `local` (this process, the default) and `ray` (each job a Ray task; see
`stealguard.reproduce.ray_engine`). Both call `run_cell` and `train_victim_job`; only the
driver writes to the store (one writer), so any database works.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from stealguard import __version__
from stealguard.data.loaders import get_loader, resolve_data_root
from stealguard.errors import ConfigError, DatasetNotFoundError, StealguardError
from stealguard.reproduce.spec import Spec, load_spec
from stealguard.reproduce.store import RunRecord, RunStore, cell_key, git_commit
from stealguard.reproduce.tasks import TASKS, CellBase, RunContext
from stealguard.reproduce.victims import VictimConfig
from stealguard.training import resolve_device


@dataclass
class Job:
    """One unit of work for an engine: a cell (or a victim to train) and where it goes."""

    kind: str  # "cell" or "victim"
    task: str
    payload: dict[str, Any]  # the cell (or victim config), as JSON-able data
    key: str


@dataclass
class JobResult:
    job: Job
    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build its RunContext (plain data: it travels to Ray workers)."""

    device: str
    artifacts: str
    data_root: str | None
    threads: int | None = None
    progress: bool = False  # inner bars (training steps, queries) for a local run on a terminal


class Engine(Protocol):
    def run(self, jobs: Sequence[Job], worker: WorkerConfig) -> Iterator[JobResult]: ...


def _context(worker: WorkerConfig) -> RunContext:
    if worker.threads:
        torch.set_num_threads(worker.threads)
    return RunContext(device=resolve_device(worker.device), artifacts=Path(worker.artifacts),
                      data_root=worker.data_root, progress=worker.progress)


def execute(job: Job, worker: WorkerConfig, ctx: RunContext | None = None) -> JobResult:
    """Run one job in this process; errors are returned, not raised (the run goes on)."""
    ctx = ctx or _context(worker)
    t0 = time.perf_counter()
    try:
        if job.kind == "victim":
            ctx.victim(VictimConfig.model_validate(job.payload))
            return JobResult(job, True, seconds=time.perf_counter() - t0)
        task = TASKS.get(job.task)
        cell = task.Cell.model_validate(job.payload)
        res = task.run(cell, ctx)
        return JobResult(job, True, res.metrics, res.series, time.perf_counter() - t0,
                         timings=_victim_timings(cell, ctx))
    except Exception as e:
        msg = str(e) if isinstance(e, StealguardError) else traceback.format_exc(limit=8)
        return JobResult(job, False, seconds=time.perf_counter() - t0,
                         error=f"{type(e).__name__}: {msg}")


def _victim_timings(cell: CellBase, ctx: RunContext) -> dict[str, float]:
    """How long the cell's victim(s) took to train (recorded when trained, in any run)."""
    seconds = [ctx.victim(v).info.get("train_seconds") for _, v in cell
               if isinstance(v, VictimConfig)]
    known = [float(s) for s in seconds if isinstance(s, int | float)]
    return {"victim_train_seconds": sum(known)} if known else {}


class LocalEngine:
    """Every job in this process, in order, sharing one RunContext (victims stay in memory)."""

    def __init__(self) -> None:
        self._ctx: tuple[WorkerConfig, RunContext] | None = None

    def run(self, jobs: Sequence[Job], worker: WorkerConfig) -> Iterator[JobResult]:
        if self._ctx is None or self._ctx[0] != worker:
            self._ctx = (worker, _context(worker))
        for job in jobs:
            yield execute(job, worker, self._ctx[1])


def _ray_engine(**kw: Any) -> Engine:
    from stealguard.reproduce.ray_engine import RayEngine

    return RayEngine(**kw)


ENGINES: dict[str, Callable[..., Engine]] = {
    "local": lambda **kw: LocalEngine(),
    "ray": _ray_engine,
}


def dataset_available(name: str, data_root: str | Path | None) -> bool:
    """Whether a train or test split of `name` (`name@split`: that split) is on disk
    (nothing is decoded)."""
    name, _, only = name.partition("@")
    loader = get_loader(name)
    sources = getattr(loader, "sources", None)
    if sources is None:
        return True
    root = resolve_data_root(data_root)
    for split in (only,) if only else ("train", "test"):
        try:
            sources(root, split)
            return True
        except DatasetNotFoundError:
            continue
    return False


@dataclass
class Plan:
    spec: Spec
    scale: str
    cells: list[CellBase]
    keys: list[str]
    missing: dict[str, list[str]]  # cell key -> datasets it needs that are missing
    stored: set[str]

    @property
    def todo(self) -> list[int]:
        return [i for i, k in enumerate(self.keys) if k not in self.missing and k not in self.stored]


def plan(spec: Spec, scale: str, store: RunStore | None, *, data_root: str | Path | None,
         overrides: dict[str, Any] | None = None) -> Plan:
    """The cells of `spec` at `scale` (with `--set` overrides), what data each lacks, and
    which are in `store` already (none when store is None: a dry run opens no store)."""
    spec = spec.with_data_root(data_root)
    cells = spec.cells(scale, data_root=data_root, overrides=overrides)
    keys = [cell_key(spec.task, c.model_dump_json()) for c in cells]
    have: dict[str, bool] = {}
    missing: dict[str, list[str]] = {}
    for c, k in zip(cells, keys):
        names = list(dict.fromkeys(c.datasets()))
        for n in names:
            if n not in have:
                have[n] = dataset_available(n, data_root)
        lacking = [n for n in names if not have[n]]
        if lacking:
            missing[k] = lacking
    stored = set(store.get_many(keys)) if store is not None else set()
    return Plan(spec, scale, cells, keys, missing, stored)


def dry_run(spec: str | Path | Spec, *, scale: str = "quick", results: str | Path = "results",
            store: str | None = None, data_root: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `reproduce` would do, writing nothing: every cell's key, status (stored, needs
    data, to run) and parameters. An existing store is read; a missing one is not created."""
    s = spec if isinstance(spec, Spec) else load_spec(spec)
    location = store or str(Path(results) / "runs.db")
    rs = RunStore(location) if _store_exists(location) else None
    try:
        p = plan(s, scale, rs, data_root=data_root, overrides=overrides)
    finally:
        if rs is not None:
            rs.close()
    rows = []
    for cell, key in zip(p.cells, p.keys):
        status = ("stored" if key in p.stored else
                  "needs data: " + ", ".join(p.missing[key]) if key in p.missing else "to run")
        rows.append({"key": key, "status": status, "params": cell.model_dump(mode="json")})
    sc = s.scale_spec(scale)
    return {"spec": s.name, "scale": scale, "note": sc.note, "cells": len(p.cells),
            "stored": len(p.stored), "need_data": len(p.missing), "to_run": len(p.todo),
            "overrides": dict(overrides or {}), "grid": rows}


def _store_exists(location: str) -> bool:
    """A SQLite path that exists, or any database URL (opening a URL creates no file here)."""
    if "://" in location:
        return not location.startswith("sqlite") or Path(location.split("///", 1)[-1]).exists()
    return Path(location).exists()


@dataclass
class Report:
    spec: str
    scale: str
    cells: int
    ran: int
    skipped_stored: int
    missing_data: int
    failed: list[tuple[str, str]]
    seconds: float
    outputs: list[Path]


def reproduce(
    spec: str | Path | Spec, *, scale: str = "quick", results: str | Path = "results",
    store: str | None = None, device: str = "cpu", data_root: str | Path | None = None,
    engine: str = "local", engine_options: dict[str, Any] | None = None,
    threads: int | None = None, progress: bool = True, write: bool = True,
    on_result: Callable[[JobResult], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Report:
    """Run every missing cell of `spec` at `scale`, then write its table and plots.

    results: the results directory (outputs go to `<results>/<scale>/<spec>/`, victims to
    `<results>/artifacts/`); store: a path or SQLAlchemy URL (default `<results>/runs.db`).
    overrides: {field path: value} set on every cell (`reproduce --set`).
    """
    t0 = time.perf_counter()
    s = spec if isinstance(spec, Spec) else load_spec(spec)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    results = Path(results)
    rs = RunStore(store or results / "runs.db")
    try:
        p = plan(s, scale, rs, data_root=data_root, overrides=overrides)
        worker = WorkerConfig(device=str(resolve_device(device)),
                              artifacts=str((results / "artifacts").resolve()),
                              data_root=str(data_root) if data_root else None, threads=threads,
                              progress=progress and engine == "local")
        eng = ENGINES[engine](**(engine_options or {}))
        failed = _run_jobs(p, rs, eng, worker, progress=progress, on_result=on_result)
        outputs: list[Path] = []
        if write:
            from stealguard.reproduce.tables import write_outputs

            outputs = write_outputs(p, rs, results / scale / s.name)
        return Report(s.name, scale, len(p.cells), len(p.todo) - len(failed), len(p.stored),
                      len(p.missing), failed, time.perf_counter() - t0, outputs)
    finally:
        rs.close()


def _run_jobs(p: Plan, rs: RunStore, eng: Engine, worker: WorkerConfig, *, progress: bool,
              on_result: Callable[[JobResult], None] | None) -> list[tuple[str, str]]:
    todo = p.todo
    if not todo:
        return []
    victims: dict[str, VictimConfig] = {}
    for i in todo:
        for _, value in p.cells[i]:
            if isinstance(value, VictimConfig):
                victims.setdefault(value.key(), value)
    jobs = [Job("victim", "", v.model_dump(mode="json"), k) for k, v in victims.items()]
    jobs += [Job("cell", p.spec.task, p.cells[i].model_dump(mode="json"), p.keys[i])
             for i in todo]
    failed: list[tuple[str, str]] = []
    bad_victims: dict[str, str] = {}
    commit, n_victims = git_commit(), len(victims)
    bar = _progress(len(jobs), f"{p.spec.name} ({p.scale})", enabled=progress)
    # Cells wait for every victim job: an engine may run victims in parallel, then cells.
    for res in _phased(eng, jobs[:n_victims], jobs[n_victims:], worker, bad_victims):
        bar.update(1)
        if on_result is not None:
            on_result(res)
        if res.job.kind == "victim":
            if not res.ok:
                bad_victims[res.job.key] = res.error
            continue
        if not res.ok:
            failed.append((res.job.key, res.error))
            bar.write(f"cell failed: {res.error.splitlines()[0] if res.error else ''}")
            continue
        cell = p.cells[p.keys.index(res.job.key)]
        rs.add(RunRecord(
            cell_key=res.job.key, spec=p.spec.name, scale=p.scale, task=p.spec.task,
            params=res.job.payload, seed=cell.seed, metrics=res.metrics, series=res.series,
            timings={"seconds": res.seconds, **res.timings}, version=__version__,
            git_commit=commit,
            device=_device_name(worker.device)))
    bar.close()
    return failed


def _phased(eng: Engine, victim_jobs: list[Job], cell_jobs: list[Job], worker: WorkerConfig,
            bad_victims: dict[str, str]) -> Iterator[JobResult]:
    yield from eng.run(victim_jobs, worker)
    runnable: list[Job] = []
    for job in cell_jobs:
        err = next((bad_victims[k] for k in bad_victims if k in _victim_keys(job)), None)
        if err is not None:
            yield JobResult(job, False, error=f"its victim failed to train: {err}")
        else:
            runnable.append(job)
    yield from eng.run(runnable, worker)


def _victim_keys(job: Job) -> list[str]:
    return [VictimConfig.model_validate(v).key() for v in job.payload.values()
            if isinstance(v, dict) and "arch" in v and "dataset" in v]


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _NullBar:
    def update(self, n: int) -> None: ...
    def write(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, *, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="job")



def _canonical(task: str, cell: CellBase) -> str:
    return f"{task}\n" + json.dumps(cell.model_dump(mode="json"), sort_keys=True)


def rekey_store(store: RunStore, *, data_root: str | Path | None = None) -> int:
    """Give each stored row the key today's specs compute for its cell.

    A cell's key is a digest of its JSON in spec order, so a row stored before a cell model
    changed shape (fields moved into the attack's params, a default written out) is no longer
    found, though it measured the same experiment. Each row is read through its task's Cell
    model (which converts the old shape), compared by content with every cell of every
    packaged spec at every scale, and re-keyed to the matching cell. Rows of no current cell
    (a grid point a spec no longer has) keep their key. Returns the number re-keyed."""
    from stealguard.reproduce.spec import spec_names

    wanted: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in spec_names():
        spec = load_spec(name).with_data_root(data_root)
        for scale in spec.scales:
            for c in spec.cells(scale, data_root=data_root):
                wanted[_canonical(spec.task, c)] = (cell_key(spec.task, c.model_dump_json()),
                                                    c.model_dump(mode="json"))

    def key_of(rec: RunRecord) -> tuple[str, dict[str, Any]]:
        try:
            cell = TASKS.get(rec.task).Cell.model_validate(rec.params)
        except (ValueError, StealguardError):  # a row of no valid cell today: left alone
            return rec.cell_key, rec.params
        return wanted.get(_canonical(rec.task, cell), (rec.cell_key, rec.params))

    return store.rekey(key_of)
