"""Where detector state and alarms live: two tables of their own, in the service's database.

    detector_state   (key_id, detector) -> the detector's arrays (npz bytes), queries seen
    detector_alarms  one row per first alarm of a detector on a key: time, queries, statistic

The tables sit next to the key store's (same SQLite file or SQLAlchemy URL, separate
tables), so a restarted service finds every key's detector state and flags where it left
them. A flag is the alarm row: policies read it, `stealguard audit <key>` shows it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from stealguard.db import open_engine
from stealguard.detect.base import Alarm
from stealguard.errors import ConfigError

metadata = MetaData()
state_table = Table(
    "detector_state", metadata,
    Column("key_id", String(64), primary_key=True),
    Column("detector", String(64), primary_key=True),
    Column("config", Text, nullable=False),  # the detector's params (JSON): state of other
    Column("seen", BigInteger, nullable=False),  # params is not reused
    Column("state", LargeBinary, nullable=False),
    Column("updated", Float, nullable=False),
)
alarms_table = Table(
    "detector_alarms", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("key_id", String(64), nullable=False, index=True),
    Column("detector", String(64), nullable=False),
    Column("queries", BigInteger, nullable=False),
    Column("statistic", Float, nullable=False),
    Column("detail", Text, nullable=False, default=""),
)


class DetectorStore:
    """Detector state and alarms in a SQLAlchemy database (an Engine, a path or a URL)."""

    def __init__(self, store: Engine | str | Path) -> None:
        self.own_engine = not isinstance(store, Engine)
        self.engine: Engine = store if isinstance(store, Engine) else open_engine(store)
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError:  # created meanwhile by another process: try once more
            try:
                metadata.create_all(self.engine)
            except SQLAlchemyError as e:
                raise ConfigError(f"cannot open the detector tables: {e}") from None

    def close(self) -> None:
        if self.own_engine:
            self.engine.dispose()

    def load(self, key_id: str, detector: str, config: str) -> bytes | None:
        s = state_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(s.config, s.state).where(
                s.key_id == key_id, s.detector == detector)).first()
        if row is None or row[0] != config:
            return None
        return bytes(row[1])

    def save(self, rows: list[tuple[str, str, str, int, bytes]]) -> None:
        """(key_id, detector, config, seen, state) rows, upserted in one transaction."""
        if not rows:
            return
        s, now = state_table.c, time.time()
        with self.engine.begin() as conn:
            for key_id, det, config, seen, blob in rows:
                values = {"config": config, "seen": seen, "state": blob, "updated": now}
                done = conn.execute(update(state_table).where(
                    s.key_id == key_id, s.detector == det).values(**values)).rowcount
                if not done:
                    conn.execute(insert(state_table).values(key_id=key_id, detector=det,
                                                            **values))

    def record(self, alarm: Alarm) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(alarms_table).values(
                time=time.time(), key_id=alarm.key_id, detector=alarm.detector,
                queries=alarm.queries, statistic=alarm.statistic, detail=alarm.detail))

    def alarms(self, key_id: str | None = None) -> list[dict[str, Any]]:
        a = alarms_table.c
        stmt = select(a.time, a.key_id, a.detector, a.queries, a.statistic, a.detail)
        if key_id is not None:
            stmt = stmt.where(a.key_id == key_id)
        with self.engine.connect() as conn:
            return [{"time": t, "key_id": k, "detector": d, "queries": int(q),
                     "statistic": float(s), "detail": det}
                    for t, k, d, q, s, det in conn.execute(stmt.order_by(a.id))]

    def flagged_keys(self) -> set[str]:
        with self.engine.connect() as conn:
            return {k for (k,) in conn.execute(select(alarms_table.c.key_id).distinct())}

    def clear(self, key_id: str) -> None:
        """Forget a key's alarms and state (an operator cleared it)."""
        with self.engine.begin() as conn:
            conn.execute(delete(alarms_table).where(alarms_table.c.key_id == key_id))
            conn.execute(delete(state_table).where(state_table.c.key_id == key_id))


def alarms_in(store: Engine | str | Path, key_id: str) -> list[dict[str, Any]]:
    """A key's alarms in a store, [] if the store has no detector tables (for `audit`)."""
    ds = DetectorStore(store)
    try:
        return ds.alarms(key_id)
    finally:
        ds.close()
