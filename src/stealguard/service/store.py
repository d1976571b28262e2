"""API keys, their budgets and rate limits, and the audit log, in one SQL database.

    store = KeyStore("service.db")               # SQLite file, WAL mode
    store = KeyStore("postgresql://u@db/sg")     # any SQLAlchemy URL (several replicas)
    key, secret = store.create_key(name="alice", budget=50_000)   # secret shown once
    key = store.authenticate(secret)             # AuthError if unknown or revoked
    charge = store.charge(key, hashes)           # atomic: all counted, or none
    store.refund(charge)                         # the model failed: a compensating row
    store.record_refusal("rate_limited", ...)    # a refused request, on record
    store.verify_audit()                         # the hash chain: first bad row, or None

Keys are stored as sha256(secret); the secret itself is never written. `charge` is one
conditional UPDATE (revoked? budget? rate window?) plus the audit row, in one transaction:
a batch that would cross the budget or the rate limit changes nothing, and two replicas
sharing the database cannot overspend a key between them. A charge is committed before the
model answers, so a crash can over-count the requests in flight but never lose one that
was answered.

The rate limit is a fixed window: at most `rate_limit` images per `rate_window` seconds,
windows aligned to multiples of `rate_window` since the epoch (a burst at a window edge can
reach twice the limit; the budget is the hard cap).

The audit log (`audit_events`) is append-only and hash-chained: rows are never updated or
deleted (a refund is a compensating `refund` row; refused requests are `refused` rows with
their code, key id when known and client address). Row n stores sha256(row n-1's hash, its
own content); `audit_head` holds the last sequence number and hash and is updated in the
same transaction as every append, which also serialises appenders (SQLite's write lock, a
row lock elsewhere) so two servers sharing a store keep one chain. `verify_audit` walks the
chain and names the first altered, deleted or inserted row. This detects edits made without
recomputing the chain; someone who can rewrite the database and knows the scheme can forge a
consistent chain, so keep the head hash (`stealguard audit verify` prints it) elsewhere and
check it with `--head`.

The schema is versioned (`store_meta.schema_version`, SCHEMA_VERSION); MIGRATIONS upgrades an
older store when it is opened. New tables (detector state, ...) can join `metadata` freely;
changes to existing tables need a migration. A new SQLite store file is created 0600.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
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
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from stealguard.blackbox import OUTPUT_MODES
from stealguard.db import open_engine
from stealguard.errors import ConfigError, QueryBudgetExceeded
from stealguard.service.errors import AuthError, BadRequest, RateLimited

SECRET_PREFIX = "sg_"
SCHEMA_VERSION = 2
GENESIS = "0" * 64  # the hash before the first audit row

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
meta_table = Table(
    "store_meta", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
audit_table = Table(
    "audit_events", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),  # 1, 2, 3, ...
    Column("request_id", String(32), nullable=False, index=True),  # a refund: its charge's
    Column("time", Float, nullable=False),  # unix seconds
    Column("kind", String(16), nullable=False),  # AUDIT_KINDS
    Column("key_id", String(32), nullable=True, index=True),  # NULL: refused, key unknown
    Column("count", Integer, nullable=False),  # images charged, refunded or refused
    Column("image_sha256", Text, nullable=False),  # charges: one hex digest per image
    Column("reason", String(40), nullable=False),  # refusals: the code; refunds: why
    Column("detail", Text, nullable=False),  # refusals: the message (shortened)
    Column("client", String(64), nullable=False),  # host:port, "" when unknown
    Column("prev_sha256", String(64), nullable=False),
    Column("row_sha256", String(64), nullable=False),
)
head_table = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("seq", BigInteger, nullable=False),
    Column("row_sha256", String(64), nullable=False),
)
legacy_audit_table = Table(  # schema 1 (before the chain); read by the migration only
    "audit_log", MetaData(),
    Column("id", Integer, primary_key=True), Column("request_id", String(32)),
    Column("time", Float), Column("key_id", String(32)), Column("count", Integer),
    Column("image_sha256", Text),
)
AUDIT_KINDS = ("charge", "refund", "refused")
CHAINED = ("request_id", "time", "kind", "key_id", "count", "image_sha256", "reason",
           "detail", "client", "prev_sha256")  # what each row's hash covers, in this order
# (not `seq`: the links order the rows, so a row slipped in under renumbered seqs is named)


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


def row_hash(row: dict[str, Any]) -> str:
    """sha256 of an audit row's CHAINED fields (its predecessor's hash included), as
    compact JSON: floats as their shortest round-trip repr, so a stored time hashes alike."""
    values = [row[c] for c in CHAINED]
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()


def _create_private(location: str) -> None:
    """A new SQLite file, created 0600 before SQLite opens it (its -wal and -shm files take
    the same mode). An existing file keeps its mode."""
    if "://" in location or location in ("", ":memory:"):
        return
    path = Path(location).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


class KeyStore:
    """Keys, accounting and the audit log in a SQLAlchemy database (created if missing)."""

    def __init__(self, store: str | Path | None = None) -> None:
        self.location = str(store if store is not None else default_store_path())
        _create_private(self.location)
        self.engine = open_engine(self.location)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer at a time; queueing writers here spares them the busy loop.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        try:
            self._open_schema()
        except SQLAlchemyError as e:
            # Two processes opening a new store at once: the other one created the tables
            # between our check and our CREATE. Check again before giving up.
            try:
                self._open_schema()
            except SQLAlchemyError:
                raise ConfigError(f"cannot open the key store at {self.location}: {e}") from None

    def _open_schema(self) -> None:
        """Create what is missing, then bring an older store up to SCHEMA_VERSION."""
        with self._writing(), self.engine.begin() as conn:
            tables = set(inspect(conn).get_table_names())
            fresh = "api_keys" not in tables
            metadata.create_all(conn)
            if conn.execute(select(head_table.c.id)).first() is None:
                conn.execute(insert(head_table).values(id=1, seq=0, row_sha256=GENESIS))
            row = conn.execute(select(meta_table.c.value).where(
                meta_table.c.name == "schema_version")).first()
            version = SCHEMA_VERSION if fresh else int(row[0]) if row else 1
            if version > SCHEMA_VERSION:
                raise ConfigError(f"the store at {self.location} has schema version {version}, "
                                  f"newer than this stealguard's {SCHEMA_VERSION}; upgrade "
                                  "stealguard")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](self, conn)
                version += 1
            values = {"name": "schema_version", "value": str(version)}
            if row is None:
                conn.execute(insert(meta_table).values(**values))
            else:
                conn.execute(update(meta_table).where(meta_table.c.name == "schema_version")
                             .values(value=str(version)))

    @property
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(meta_table.c.value).where(
                meta_table.c.name == "schema_version")).scalar_one())

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
                            "`X-API-Key: <key>`", code="missing_key")
        with self.engine.connect() as conn:
            row = conn.execute(select(keys_table).where(
                keys_table.c.secret_sha256 == hash_secret(secret))).first()
        if row is None:
            raise AuthError("unknown API key", code="unknown_key")
        key = _key(row)
        if key.revoked is not None:
            raise AuthError(f"API key {key.id} was revoked at {_iso(key.revoked)}",
                            code="revoked_key")
        return key

    # accounting ---------------------------------------------------------------------------

    def charge(self, key: ApiKey, hashes: list[str], *, now: float | None = None,
               client: str = "") -> Charge:
        """Count len(hashes) images against `key` and log them, or refuse them all.

        Raises QueryBudgetExceeded, RateLimited, BadRequest (a batch over the rate limit) or
        AuthError (revoked meanwhile); nothing is counted or logged then (the app records
        the refusal itself, with `record_refusal`).
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
            if conn.execute(stmt).rowcount != 1:  # the key row first, then the audit head
                row = conn.execute(select(keys_table).where(k.id == key.id)).first()
                raise _refusal(row, n, window, now)
            used, budget = conn.execute(select(k.used, k.budget).where(k.id == key.id)).one()
            self._append(conn, request_id=request_id, time=now, kind="charge", key_id=key.id,
                         count=n, image_sha256=" ".join(hashes), client=client)
        return Charge(request_id, key.id, n, int(used), budget)

    def refund(self, charge: Charge, *, reason: str = "not answered") -> None:
        """Give back a charge whose batch was not answered (the model failed): the key's
        count goes down and a compensating `refund` row is appended. Call once per charge."""
        k = keys_table.c
        n = charge.count
        with self._writing(), self.engine.begin() as conn:
            conn.execute(update(keys_table).where(k.id == charge.key_id).values(
                used=k.used - n,
                window_used=case((k.window_used >= n, k.window_used - n), else_=0)))
            self._append(conn, request_id=charge.request_id, time=time.time(), kind="refund",
                         key_id=charge.key_id, count=n, reason=reason[:40])

    def record_refusal(self, code: str, *, detail: str = "", key_id: str | None = None,
                       client: str = "", count: int = 0, path: str = "") -> str:
        """Append a `refused` row (the code, the key id when known, the client address, the
        images it asked for when known); returns its request id."""
        request_id = uuid.uuid4().hex
        shown = f"{path}: {detail}" if path else detail
        with self._writing(), self.engine.begin() as conn:
            self._append(conn, request_id=request_id, time=time.time(), kind="refused",
                         key_id=key_id, count=int(count), reason=code[:40],
                         detail=shown[:300], client=client[:64])
        return request_id

    def _append(self, conn: Connection, **fields: Any) -> None:
        """One chained audit row, inside the caller's transaction. The head row is updated
        first: that write lock orders every appender, across processes too."""
        h = head_table.c
        conn.execute(update(head_table).where(h.id == 1).values(seq=h.seq + 1))
        seq, prev = conn.execute(select(h.seq, h.row_sha256).where(h.id == 1)).one()
        row = {"seq": int(seq), "key_id": None, "count": 0, "image_sha256": "", "reason": "",
               "detail": "", "client": "", **fields, "prev_sha256": prev}
        row["time"] = float(row["time"])
        row["row_sha256"] = row_hash(row)
        conn.execute(insert(audit_table).values(**row))
        conn.execute(update(head_table).where(h.id == 1).values(row_sha256=row["row_sha256"]))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # audit --------------------------------------------------------------------------------

    def audit_summary(self, key_ref: str) -> dict[str, Any]:
        """Answered requests and images (charges less refunds), distinct images, first and
        last time, refunds and refusals, for one key. (Distinct images are counted in
        memory: about 100 bytes per logged image.)"""
        key = self.resolve(key_ref)
        a = audit_table.c
        requests = images = refunds = refused = 0
        first = last = None
        charges: dict[str, str] = {}
        with self.engine.connect() as conn:
            for kind, rid, t, n, hashes in conn.execute(
                    select(a.kind, a.request_id, a.time, a.count, a.image_sha256)
                    .where(a.key_id == key.id).order_by(a.seq)):
                if kind == "charge":
                    requests, images, charges[rid] = requests + 1, images + n, hashes
                    first, last = first if first is not None else t, t
                elif kind == "refund":
                    requests, images, refunds = requests - 1, images - n, refunds + 1
                    charges.pop(rid, None)
                else:
                    refused += 1
        distinct: set[str] = set()
        for hashes in charges.values():
            distinct.update(hashes.split())
        return {"key": key.id, "name": key.name, "revoked": bool(key.revoked),
                "requests": requests, "images": images, "distinct_images": len(distinct),
                "refunds": refunds, "refused": refused, "first": _iso(first),
                "last": _iso(last), "used": key.used, "budget": key.budget,
                "remaining": key.remaining}

    def audit_rows(self, key_ref: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The key's charges, newest first: time, request id, count, image hashes, client,
        and whether it was refunded."""
        key = self.resolve(key_ref)
        a = audit_table.c
        with self.engine.connect() as conn:
            refunded = {r for (r,) in conn.execute(select(a.request_id).where(
                a.key_id == key.id, a.kind == "refund"))}
            stmt = select(a.time, a.request_id, a.count, a.image_sha256, a.client).where(
                a.key_id == key.id, a.kind == "charge").order_by(a.seq.desc()).limit(limit)
            return [{"time": t, "request_id": r, "count": c, "image_sha256": h.split(),
                     "client": cl, "refunded": r in refunded}
                    for t, r, c, h, cl in conn.execute(stmt)]

    def refusals(self, key_ref: str | None = None, *, reason: str | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
        """Refused requests, newest first (all, or one key's, or one code's)."""
        a = audit_table.c
        stmt = select(a.seq, a.time, a.request_id, a.key_id, a.reason, a.count, a.client,
                      a.detail).where(a.kind == "refused")
        if key_ref is not None:
            stmt = stmt.where(a.key_id == self.resolve(key_ref).id)
        if reason is not None:
            stmt = stmt.where(a.reason == reason)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(a.seq.desc()).limit(limit)).all()
        return [{"seq": seq, "time": t, "request_id": rid, "key_id": kid, "reason": why,
                 "count": n, "client": cl, "detail": d}
                for seq, t, rid, kid, why, n, cl, d in rows]

    def verify_audit(self, *, head: str | None = None) -> AuditCheck:
        """Walk the chain in sequence order; the first altered, deleted or inserted row.

        A row whose stored hash does not match its content was altered, unless the next row
        links straight past it (then it was inserted); a row whose content is intact but
        whose link is not follows deleted rows. The chain's end must match `audit_head`
        (rows deleted at the end) and, when given, the head hash the operator kept."""
        a = audit_table.c
        with self.engine.connect() as conn:
            stored = conn.execute(select(head_table.c.seq, head_table.c.row_sha256)).first()
            rows = (dict(r._mapping) for r in conn.execute(select(audit_table).order_by(a.seq)))
            check = _walk_chain(rows)
        if check.problem is None and stored is not None and (
                (check.rows, check.head) != (int(stored[0]), stored[1])):
            check.problem = (f"the chain ends at row {check.last_seq or 0} but the store's head "
                             f"says row {stored[0]}: rows were deleted at the end (or the head "
                             f"was edited)")
        if check.problem is None and head is not None and head != check.head:
            check.problem = (f"the chain's head hash {check.head[:16]}... is not the one given "
                             f"({head[:16]}...): the log was rewritten or truncated")
        return check

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
    if n > key.rate_limit:  # never fits: no Retry-After
        return BadRequest(f"a batch of {n} images can never fit this key's rate limit of "
                          f"{key.rate_limit} images per {key.rate_window:g} s; send smaller "
                          f"batches", code="batch_over_rate_limit")
    return RateLimited(f"rate limit: {in_window} of {key.rate_limit} images used in this "
                       f"{key.rate_window:g} s window, a batch of {n} would exceed it; retry "
                       f"in {retry:.2f} s", retry_after=retry)


@dataclass
class AuditCheck:
    """What `verify_audit` found: rows walked, the last hash, the first problem (None: ok)."""

    rows: int = 0
    head: str = GENESIS
    last_seq: int | None = None
    problem: str | None = None
    bad_seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _walk_chain(rows: Any) -> AuditCheck:
    check = AuditCheck()
    prev: dict[str, Any] | None = None  # the last good row
    before = GENESIS  # the hash of the good row before `prev`
    pending: dict[str, Any] | None = None  # a row whose own hash failed, judged by the next
    for row in rows:
        intact = row_hash(row) == row["row_sha256"]
        if pending is not None:
            what = "inserted" if intact and row["prev_sha256"] == check.head else "altered"
            return _bad(check, pending["seq"], f"row {pending['seq']} was {what} (its hash "
                                               f"does not match its content)")
        if not intact:
            pending = row
            continue
        if row["prev_sha256"] != check.head:
            if prev is not None and row["prev_sha256"] == before:
                return _bad(check, prev["seq"], f"row {prev['seq']} was inserted (row "
                                                f"{row['seq']} links past it)")
            after = f"after row {prev['seq']}" if prev is not None else "at the start"
            gap = row["seq"] - (prev["seq"] if prev is not None else 0) - 1
            what = f"{gap} row(s) deleted" if gap > 0 else "rows replaced or removed"
            return _bad(check, row["seq"], f"{what} before row {row['seq']} ({after}): its "
                                           f"link to the previous row is broken")
        prev, before, check.head, check.last_seq = row, check.head, row["row_sha256"], row["seq"]
        check.rows += 1
    if pending is not None:
        return _bad(check, pending["seq"], f"row {pending['seq']} was altered or inserted "
                                           f"(its hash does not match its content)")
    return check


def _bad(check: AuditCheck, seq: int, problem: str) -> AuditCheck:
    check.problem, check.bad_seq = problem, seq
    return check


def _migrate_1_to_2(store: KeyStore, conn: Connection) -> None:
    """Schema 1 kept an unchained `audit_log` whose refunds deleted rows: copy its rows, in
    order, into the chain as charges (the old table stays, unread)."""
    if "audit_log" not in inspect(conn).get_table_names():
        return
    old = legacy_audit_table.c
    for rid, t, key_id, n, hashes in conn.execute(select(
            old.request_id, old.time, old.key_id, old.count, old.image_sha256).order_by(old.id)):
        store._append(conn, request_id=rid, time=t, kind="charge", key_id=key_id, count=n,
                      image_sha256=hashes, reason="from schema 1")


# version -> the function that upgrades a store from it to version + 1, in one transaction
MIGRATIONS: dict[int, Callable[[KeyStore, Connection], None]] = {1: _migrate_1_to_2}
