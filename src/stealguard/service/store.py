"""API keys, their budgets and rate limits, and the audit log, in one SQL database.

    store = KeyStore("service.db")               # SQLite file, WAL mode
    store = KeyStore("postgresql://u@db/sg")     # any SQLAlchemy URL (several replicas)
    key, secret = store.create_key(name="alice", budget=50_000)   # secret shown once
    key = store.authenticate(secret)             # AuthError if unknown or revoked
    charge = store.charge(key, 64, hashes)       # atomic: all 64 counted, or none
    store.refund(charge)                         # the model failed: give them back

Keys are stored as sha256(secret); the secret itself is never written. `charge` is one
conditional UPDATE (revoked? budget? rate window?) plus the audit row, in one transaction:
a batch that would cross the budget or the rate limit changes nothing, and two replicas
sharing the database cannot overspend a key between them. A charge is committed before the
model answers, so a crash can over-count the requests in flight but never lose one that
was answered.

The rate limit is a fixed window: at most `rate_limit` images per `rate_window` seconds,
windows aligned to multiples of `rate_window` since the epoch (a burst at a window edge can
reach twice the limit; the budget is the hard cap).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from stealguard.blackbox import OUTPUT_MODES
from stealguard.db import open_engine
from stealguard.errors import ConfigError, QueryBudgetExceeded
from stealguard.service.errors import AuthError, RateLimited

SECRET_PREFIX = "sg_"

metadata = MetaData()
keys_table = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),  # public id, shown in lists and the audit log
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False, default=""),
    Column("created", Float, nullable=False),  # unix seconds
    Column("revoked", Float, nullable=True),  # unix seconds, NULL while valid
    Column("budget", BigInteger, nullable=True),  # NULL: unlimited
    Column("used", BigInteger, nullable=False, default=0),
    Column("rate_limit", BigInteger, nullable=True),  # images per window, NULL: unlimited
    Column("rate_window", Float, nullable=False, default=60.0),  # seconds
    Column("window_start", BigInteger, nullable=False, default=0),  # window number
    Column("window_used", BigInteger, nullable=False, default=0),
    Column("output", String(8), nullable=False, default="probs"),
    Column("k", Integer, nullable=False, default=1),
)
audit_table = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False, unique=True),
    Column("time", Float, nullable=False),  # unix seconds
    Column("key_id", String(32), nullable=False, index=True),
    Column("count", Integer, nullable=False),
    Column("image_sha256", Text, nullable=False),  # one hex digest per image, space-separated
)


@dataclass(frozen=True)
class ApiKey:
    """One key as stored (never with its secret)."""

    id: str
    name: str
    created: float
    revoked: float | None
    budget: int | None
    used: int
    rate_limit: int | None
    rate_window: float
    output: str
    k: int

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.used)

    def public(self) -> dict[str, Any]:
        """What `keys list` shows."""
        return {"id": self.id, "name": self.name, "created": _iso(self.created),
                "revoked": _iso(self.revoked) if self.revoked else "", "budget": self.budget,
                "used": self.used, "remaining": self.remaining, "rate_limit": self.rate_limit,
                "rate_window_s": self.rate_window, "output": self.output, "k": self.k}


@dataclass(frozen=True)
class Charge:
    """An accepted batch: the audit row that records it and the key's count after it."""

    request_id: str
    key_id: str
    count: int
    used: int
    budget: int | None

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def default_store_path() -> Path:
    return Path(platformdirs.user_data_dir("stealguard")) / "service.db"


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))




class KeyStore:
    """Keys, accounting and the audit log in a SQLAlchemy database (created if missing)."""

    def __init__(self, store: str | Path | None = None) -> None:
        self.location = str(store if store is not None else default_store_path())
        self.engine = open_engine(self.location)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer at a time; queueing writers here spares them the busy loop.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as e:
            # Two processes opening a new store at once: the other one created the tables
            # between our check and our CREATE. Check again before giving up.
            try:
                metadata.create_all(self.engine)
            except SQLAlchemyError:
                raise ConfigError(f"cannot open the key store at {self.location}: {e}") from None

    def close(self) -> None:
        self.engine.dispose()

    # keys ---------------------------------------------------------------------------------

    def create_key(
        self, *, name: str = "", budget: int | None = None, rate_limit: int | None = None,
        rate_window: float = 60.0, output: str = "probs", k: int = 1,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret. The secret is not stored: show it once."""
        if budget is not None and budget < 0:
            raise ConfigError(f"budget must be >= 0 (or none), got {budget}")
        if rate_limit is not None and rate_limit < 1:
            raise ConfigError(f"rate limit must be >= 1 image per window, got {rate_limit}")
        if not (rate_window > 0 and math.isfinite(rate_window)):
            raise ConfigError(f"rate window must be > 0 seconds, got {rate_window}")
        if output not in OUTPUT_MODES:
            raise ConfigError(f"unknown output mode {output!r}; valid: {', '.join(OUTPUT_MODES)}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = {"id": "k" + secrets.token_hex(6), "secret_sha256": hash_secret(secret),
               "name": name, "created": time.time(), "revoked": None, "budget": budget,
               "used": 0, "rate_limit": rate_limit, "rate_window": float(rate_window),
               "window_start": 0, "window_used": 0, "output": output, "k": int(k)}
        with self._writing(), self.engine.begin() as conn:
            conn.execute(insert(keys_table).values(**row))
        return self.get(str(row["id"])), secret

    def get(self, key_id: str) -> ApiKey:
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.id == key_id)).first()
        if row is None:
            raise ConfigError(f"no key {key_id!r} in {self.location} (see `keys list`)")
        return _key(row)

    def resolve(self, ref: str) -> ApiKey:
        """A key by id, or by name when exactly one key has that name."""
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.id == ref)).first()
            if row is not None:
                return _key(row)
            rows = conn.execute(select(keys_table).where(keys_table.c.name == ref)).all()
        if len(rows) == 1:
            return _key(rows[0])
        what = "several keys are" if rows else "no key is"
        raise ConfigError(f"{what} called {ref!r} in {self.location}; give a key id "
                          "(see `keys list`)")

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(keys_table).order_by(keys_table.c.created)).all()
        return [_key(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        key = self.resolve(key_id)
        with self._writing(), self.engine.begin() as conn:
            conn.execute(update(keys_table).where(keys_table.c.id == key.id,
                                                  keys_table.c.revoked.is_(None))
                         .values(revoked=time.time()))
        return self.get(key.id)

    def authenticate(self, secret: str | None) -> ApiKey:
        """The key whose secret this is; AuthError (401 unknown, 403 revoked) otherwise."""
        if not secret:
            raise AuthError("missing API key: send it as `Authorization: Bearer <key>` or "
                            "`X-API-Key: <key>`")
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(
                keys_table.c.secret_sha256 == hash_secret(secret))).first()
        if row is None:
            raise AuthError("unknown API key")
        key = _key(row)
        if key.revoked is not None:
            raise AuthError(f"API key {key.id} was revoked at {_iso(key.revoked)}", status=403)
        return key

    # accounting ---------------------------------------------------------------------------

    def charge(self, key: ApiKey, hashes: list[str], *, now: float | None = None) -> Charge:
        """Count len(hashes) images against `key` and log them, or refuse them all.

        Raises QueryBudgetExceeded, RateLimited or AuthError (revoked meanwhile); nothing is
        counted or logged then.
        """
        n, now = len(hashes), time.time() if now is None else now
        k = keys_table.c
        window = int(now // key.rate_window)
        in_window = case((k.window_start == window, k.window_used), else_=0)
        stmt = (update(keys_table)
                .where(k.id == key.id, k.revoked.is_(None),
                       or_(k.budget.is_(None), k.used + n <= k.budget),
                       or_(k.rate_limit.is_(None), in_window + n <= k.rate_limit))
                .values(used=k.used + n, window_used=in_window + n, window_start=window))
        request_id = uuid.uuid4().hex
        with self._writing(), self.engine.begin() as conn:
            if conn.execute(stmt).rowcount != 1:
                row = conn.execute(select(keys_table).where(k.id == key.id)).first()
                raise _refusal(row, n, window, now)
            used, budget = conn.execute(select(k.used, k.budget).where(k.id == key.id)).one()
            conn.execute(insert(audit_table).values(
                request_id=request_id, time=now, key_id=key.id, count=n,
                image_sha256=" ".join(hashes)))
        return Charge(request_id, key.id, n, int(used), budget)

    def refund(self, charge: Charge) -> None:
        """Undo a charge whose batch was not answered (the model failed)."""
        k = keys_table.c
        with self._writing(), self.engine.begin() as conn:
            deleted = conn.execute(delete(audit_table).where(
                audit_table.c.request_id == charge.request_id)).rowcount
            if deleted:
                n = charge.count
                conn.execute(update(keys_table).where(k.id == charge.key_id).values(
                    used=k.used - n,
                    window_used=case((k.window_used >= n, k.window_used - n), else_=0)))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # audit --------------------------------------------------------------------------------

    def audit_summary(self, key_ref: str) -> dict[str, Any]:
        """Requests, images, distinct images, first and last time, for one key. (Distinct
        images are counted in memory: about 100 bytes per logged image.)"""
        key = self.resolve(key_ref)
        a = audit_table.c
        with self.engine.connect() as conn:
            requests, images, first, last = conn.execute(
                select(func.count(), func.coalesce(func.sum(a.count), 0), func.min(a.time),
                       func.max(a.time)).where(a.key_id == key.id)).one()
            distinct: set[str] = set()
            for (hashes,) in conn.execute(select(a.image_sha256).where(a.key_id == key.id)):
                distinct.update(hashes.split())
        return {"key": key.id, "name": key.name, "revoked": bool(key.revoked),
                "requests": int(requests), "images": int(images),
                "distinct_images": len(distinct), "first": _iso(first), "last": _iso(last),
                "used": key.used, "budget": key.budget, "remaining": key.remaining}

    def audit_rows(self, key_ref: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The key's audit rows, newest first: time, request id, count, image hashes."""
        key = self.resolve(key_ref)
        a = audit_table.c
        stmt = select(a.time, a.request_id, a.count, a.image_sha256).where(
            a.key_id == key.id).order_by(a.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [{"time": t, "request_id": r, "count": c, "image_sha256": h.split()}
                    for t, r, c, h in conn.execute(stmt)]

    def _writing(self) -> Any:
        return self._write_lock if self._write_lock is not None else _NoLock()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _key(row: Any) -> ApiKey:
    m = row._mapping
    return ApiKey(id=m["id"], name=m["name"], created=m["created"], revoked=m["revoked"],
                  budget=m["budget"], used=int(m["used"]), rate_limit=m["rate_limit"],
                  rate_window=float(m["rate_window"]), output=m["output"], k=int(m["k"]))


def _refusal(row: Any, n: int, window: int, now: float) -> Exception:
    """Why the conditional UPDATE matched no row, as the exception to raise."""
    if row is None:
        return AuthError("unknown API key")
    key = _key(row)
    if key.revoked is not None:
        return AuthError(f"API key {key.id} was revoked at {_iso(key.revoked)}", status=403)
    if key.budget is not None and key.used + n > key.budget:
        return QueryBudgetExceeded(n, key.used, key.budget)
    assert key.rate_limit is not None
    in_window = row._mapping["window_used"] if row._mapping["window_start"] == window else 0
    retry = (window + 1) * key.rate_window - now
    if n > key.rate_limit:
        return RateLimited(f"rate limit: a batch of {n} images is more than this key's "
                           f"{key.rate_limit} images per {key.rate_window:g} s; send smaller "
                           f"batches", retry_after=retry)
    return RateLimited(f"rate limit: {in_window} of {key.rate_limit} images used in this "
                       f"{key.rate_window:g} s window, a batch of {n} would exceed it; retry "
                       f"in {retry:.2f} s", retry_after=retry)
