"""The run store: one row per measured cell, in SQLite (default) or any SQLAlchemy database.

    store = RunStore("results/runs.db")
    store.has(key); store.add(record); store.get_many(keys)

A row holds the spec and scale that first ran the cell, the cell's parameters (JSON), its
seed, metrics and series (JSON), timings, the stealguard version, the git commit, the device
and the host. The key is a digest of the task and the validated cell, not of the spec, so a
cell that two specs share (EDM Table 3's KnockoffNets rows are also Table 2's and Table 4's)
is measured once.

Writes: a row is inserted in one transaction once its cell has finished, so an interrupted
run leaves no half-written row, and an existing key is never overwritten. The schema version
lives in a `meta` table; a store written by another version is reported, not changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, inspect, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from stealguard import __version__
from stealguard.db import open_engine
from stealguard.errors import StealguardError

SCHEMA_VERSION = "1"

_meta = MetaData()
meta_table = Table("meta", _meta, Column("key", String(64), primary_key=True),
                   Column("value", Text, nullable=False))
runs_table = Table(
    "runs", _meta,
    Column("cell_key", String(64), primary_key=True),
    Column("spec", String(128), nullable=False),
    Column("scale", String(16), nullable=False),
    Column("task", String(64), nullable=False),
    Column("params", Text, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("metrics", Text, nullable=False),
    Column("series", Text, nullable=False),
    Column("timings", Text, nullable=False),
    Column("version", String(32), nullable=False),
    Column("git_commit", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("host", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)


class StoreVersionError(StealguardError):
    """The run store was written by an incompatible stealguard (it is left untouched)."""


def cell_key(task: str, cell_json: str) -> str:
    return hashlib.sha256(f"{task}\n{cell_json}".encode()).hexdigest()[:32]


def git_commit() -> str:
    """The commit of the stealguard checkout in use ("" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class RunRecord:
    cell_key: str
    spec: str
    scale: str
    task: str
    params: dict[str, Any]
    seed: int
    metrics: dict[str, float]
    series: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    version: str = __version__
    git_commit: str = ""
    device: str = "cpu"
    host: str = field(default_factory=platform.node)
    created_at: float = field(default_factory=time.time)


def _json(value: Any) -> str:
    def clean(v: Any) -> Any:  # JSON has no NaN/inf: store them as null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), sort_keys=True)


class RunStore:
    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.engine = open_engine(self.location)
        try:
            self._check_schema()
        except SQLAlchemyError as e:
            raise StoreVersionError(f"run store {self.location}: cannot be read as a "
                                    f"stealguard run store ({e.__class__.__name__}: {e}); use "
                                    "another --store") from None

    def _check_schema(self) -> None:
        names = set(inspect(self.engine).get_table_names())
        if names and "meta" not in names:
            raise StoreVersionError(
                f"run store {self.location} holds tables {sorted(names)} but no stealguard "
                "meta table: it is not a run store; point --store at a new file")
        if "meta" in names:
            with self.engine.connect() as c:
                row = c.execute(select(meta_table.c.value).where(
                    meta_table.c.key == "schema_version")).first()
                wrote = c.execute(select(meta_table.c.value).where(
                    meta_table.c.key == "created_by")).first()
            if row is None or row[0] != SCHEMA_VERSION:
                raise StoreVersionError(
                    f"run store {self.location} has schema version "
                    f"{row[0] if row else 'unknown'} (written by stealguard "
                    f"{wrote[0] if wrote else '?'}); this stealguard {__version__} reads schema "
                    f"{SCHEMA_VERSION}. Nothing was changed: use a new --store, or the "
                    "stealguard version that wrote it")
            return
        _meta.create_all(self.engine)
        with self.engine.begin() as c:
            c.execute(meta_table.insert(), [
                {"key": "schema_version", "value": SCHEMA_VERSION},
                {"key": "created_by", "value": __version__}])

    def has(self, key: str) -> bool:
        with self.engine.connect() as c:
            return c.execute(select(runs_table.c.cell_key).where(
                runs_table.c.cell_key == key)).first() is not None

    def add(self, record: RunRecord) -> bool:
        """Insert `record` in one transaction; False (and nothing written) if its key exists."""
        row = asdict(record)
        for k in ("params", "metrics", "series", "timings"):
            row[k] = _json(row[k])
        try:
            with self.engine.begin() as c:
                c.execute(runs_table.insert().values(**row))
        except IntegrityError:
            return False
        return True

    def get_many(self, keys: Iterable[str]) -> dict[str, RunRecord]:
        keys = list(keys)
        out: dict[str, RunRecord] = {}
        with self.engine.connect() as c:
            for i in range(0, len(keys), 500):
                q = select(runs_table).where(runs_table.c.cell_key.in_(keys[i:i + 500]))
                for r in c.execute(q).mappings():
                    out[r["cell_key"]] = _record(r)
        return out

    def all(self, *, spec: str | None = None) -> list[RunRecord]:
        q = select(runs_table).order_by(runs_table.c.created_at)
        if spec is not None:
            q = q.where(runs_table.c.spec == spec)
        with self.engine.connect() as c:
            return [_record(r) for r in c.execute(q).mappings()]

    def rekey(self, key_of: Callable[[RunRecord], tuple[str, dict[str, Any]]]) -> int:
        """Give each stored row the key (and params) `key_of(record)` says it has now, in one
        transaction: for rows stored before a cell model changed shape without changing the
        experiment (an old field moved, a default written out). A row whose new key is taken
        already is left as it is. Returns the number of rows re-keyed."""
        moved = 0
        with self.engine.begin() as c:
            taken = {r[0] for r in c.execute(select(runs_table.c.cell_key))}
            for rec in [_record(r) for r in c.execute(select(runs_table)).mappings()]:
                key, params = key_of(rec)
                if key == rec.cell_key or key in taken:
                    continue
                c.execute(runs_table.update().where(runs_table.c.cell_key == rec.cell_key)
                          .values(cell_key=key, params=_json(params)))
                taken.add(key)
                moved += 1
        return moved

    def close(self) -> None:
        self.engine.dispose()


def _record(r: Any) -> RunRecord:
    d = dict(r)
    for k in ("params", "metrics", "series", "timings"):
        d[k] = json.loads(d[k])
    d["metrics"] = {k: (float("nan") if v is None else v) for k, v in d["metrics"].items()}
    return RunRecord(**d)
