"""One way to open a database for the service's key store and the reproduce run store.

    engine = open_engine("results/runs.db")              # SQLite file in WAL mode
    engine = open_engine("postgresql+psycopg://u@h/db")  # any SQLAlchemy URL
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from stealguard.errors import ConfigError


def open_engine(store: str | Path) -> Engine:
    """A path (or sqlite URL) -> SQLite in WAL mode; anything with '://' -> that database."""
    s = str(store)
    if "://" not in s:
        Path(s).expanduser().parent.mkdir(parents=True, exist_ok=True)
        s = f"sqlite:///{Path(s).expanduser()}"
    try:
        url = make_url(s)
    except ArgumentError as e:
        raise ConfigError(f"store {store!r} is neither a path nor a SQLAlchemy URL: {e}") from None
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except ImportError as e:
            raise ConfigError(f"store {url.render_as_string()}: the database driver is not "
                              f"installed ({e}); for PostgreSQL: pip install psycopg") from None
    in_memory = url.database in (None, "", ":memory:")
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                           **({"poolclass": StaticPool} if in_memory else {}))  # one shared db

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine
