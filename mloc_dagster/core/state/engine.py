"""One engine and one transaction discipline for every part of the state store.

- embedded: a SQLite file under ``MLOC_HOME`` (``sqlite:///<MLOC_HOME>/state.db``), written by
  several run workers, the daemon's sensors and the CLI at once -- hence WAL, a generous busy
  timeout, and ``BEGIN IMMEDIATE`` for every write so a transaction never has to upgrade a read
  lock into a write lock (that upgrade is where SQLite answers "database is locked" at once,
  without waiting);
- production: PostgreSQL (``postgresql+psycopg2://...``), READ COMMITTED.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mloc_dagster.core.redact import redact, redact_url
from mloc_dagster.core.state.schema import SCHEMA_LOCK_KEY, create_or_migrate


def resolve_state_url(mloc_home: str | os.PathLike[str] | None = None) -> str:
    """``MLOC_DATABASE_URL`` if set, else the SQLite file under ``MLOC_HOME`` (default ``.mloc``)."""
    url = os.environ.get("MLOC_DATABASE_URL")
    if url:
        return url
    home = Path(mloc_home if mloc_home is not None else os.environ.get("MLOC_HOME", ".mloc"))
    return f"sqlite:///{home.resolve() / 'state.db'}"


class StateStoreUnavailable(RuntimeError):
    """The state store cannot be opened (bad URL, database unreachable, refused login)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def strict_json(value: Any) -> str:
    """The JSON columns' encoding, the same on both backends: a non-finite float (NaN, ±Infinity:
    an unbounded norm bound, a CER of nothing) is stored as null, since PostgreSQL's json type
    refuses those tokens and would fail the whole write."""
    return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class StoreEngine:
    """The connection side of the store: engine, read/write transactions, schema, clock.

    ``clock`` exists for tests (stale heartbeats, daily quotas); it must return aware UTC times.
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, clock: Callable[[], datetime] = utcnow,
                 echo: bool = False) -> None:
        self.url = url  # may carry the password: show it only as redact_url(url)
        self._clock = clock
        try:
            retry_transient(lambda: self._open_once(url, busy_timeout_s, echo), first_delay_s=0.2)
        except (sa.exc.SQLAlchemyError, ValueError) as exc:
            if hasattr(self, "_engine"):
                self._engine.dispose()
            # Not chained: the driver's own message is shown only redacted.
            raise StateStoreUnavailable(f"cannot open the state store {redact_url(url)}: {redact(str(exc))}") \
                from None

    def _open_once(self, url: str, busy_timeout_s: float, echo: bool) -> None:
        """Open and create the schema; SQLite's "database is locked" when several processes create a
        new database's schema at once (switching it to WAL can be refused without waiting for the
        busy timeout) is retried by the caller; any other operational error (a server that refuses the
        connection, bad credentials) is not."""
        try:
            self._open(url, busy_timeout_s, echo)
        except sa.exc.OperationalError as exc:
            if hasattr(self, "_engine"):
                self._engine.dispose()
            if "database is locked" in str(exc):
                raise
            raise ValueError(str(exc)) from exc  # not transient: no retry

    def _open(self, url: str, busy_timeout_s: float, echo: bool) -> None:
        parsed = sa.engine.make_url(url)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = sa.create_engine(
                url, echo=echo, connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
                json_serializer=strict_json,
            )
            _configure_sqlite(self._engine, busy_timeout_s)
        else:
            self._engine = sa.create_engine(url, echo=echo, pool_pre_ping=True, json_serializer=strict_json)
        # Write transactions take SQLite's write lock up front (BEGIN IMMEDIATE); see module doc.
        self._write_engine = self._engine.execution_options(mloc_write=True)
        self.migrated = self._create_schema()

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({redact_url(self.url)!r})"

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    def _create_schema(self) -> list[str]:
        """Create or migrate the schema; safe when several processes construct a store at once.

        ``create_all(checkfirst=True)`` alone races (both see "no table", both CREATE). Holding
        the database's write lock while checking and changing makes it idempotent: SQLite's
        BEGIN IMMEDIATE, PostgreSQL's transaction-scoped advisory lock.
        """
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            return create_or_migrate(conn)

    def _insert(self, table: sa.Table) -> Any:
        """INSERT supporting ``on_conflict_do_*`` on the back-ends we run on."""
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        if self._is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        raise NotImplementedError(f"state store supports sqlite and postgresql, not {self._engine.dialect.name}")

    def _today(self) -> str:
        d: date = self._clock().astimezone(UTC).date()
        return d.isoformat()


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN is always
        # DEFERRED); see https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#pysqlite-serializable
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # busy_timeout first: switching to WAL itself needs the lock when another process holds it.
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor vice versa
        cur.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("mloc_write") else "BEGIN")


def retry_transient(fn: Callable[[], Any], *, attempts: int = 4, first_delay_s: float = 0.5,
                    log: Callable[[str], None] | None = None, sleep: Callable[[float], None] | None = None) -> Any:
    """Call ``fn``; on a database error (lost connection, lock timeout, failover) wait and try
    again with exponential backoff, logging each failure. The last error propagates."""
    import time

    sleep = sleep or time.sleep
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except sa.exc.DBAPIError as exc:
            if attempt == attempts:
                raise
            delay = first_delay_s * 2 ** (attempt - 1)
            if log is not None:
                log(f"state store error (attempt {attempt}/{attempts}), retrying in {delay:.1f} s: "
                    f"{str(exc).splitlines()[0][:200]}")
            sleep(delay)
    raise AssertionError("unreachable")
