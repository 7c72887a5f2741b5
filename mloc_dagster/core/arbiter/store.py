"""The lease store: one SQLite file per node that every process on the node shares.

- ``leases``  one row per held device. ``device_idx`` is the primary key, so the database itself
  refuses to grant a device twice, whatever the code above it does.
- ``queue``   one row per waiting request. Granting order is ``priority DESC, ticket ASC``
  (priority, then first come first served).
- ``devices`` the node's inventory with the last memory figures NVML gave.
- ``counters``/``hist_sum`` the node's ledger of decisions (what `mloc gpu status` shows); every
  ledger entry is also handed to ``metrics`` after its transaction commits.

Every change runs in one ``BEGIN IMMEDIATE`` transaction, itself taken behind a kernel ``flock``:
contending processes are then woken by the kernel as soon as the lock is free, instead of by
SQLite's busy handler, which sleeps with a back-off of up to 100 ms and ruins tail latency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from mloc_dagster.core.arbiter import metrics
from mloc_dagster.core.arbiter.devices import Device, NvmlBackend, read_memory
from mloc_dagster.core.arbiter.policy import TaskPolicy, policy_json

try:  # flock is POSIX only; elsewhere SQLite's own busy handler serializes writers.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("mloc_dagster.arbiter")

DB_NAME = "arbiter.sqlite"
LOCK_NAME = "arbiter.lock"
SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    idx INTEGER PRIMARY KEY, uuid TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    total_mb REAL, free_mb REAL, processes INTEGER, updated_at REAL
);
CREATE TABLE IF NOT EXISTS queue (
    ticket INTEGER PRIMARY KEY AUTOINCREMENT, lease_id TEXT NOT NULL UNIQUE, holder TEXT NOT NULL,
    task_type TEXT NOT NULL, priority INTEGER NOT NULL, min_free_mb INTEGER NOT NULL,
    max_hold_s REAL, ttl_s REAL NOT NULL, node TEXT NOT NULL, pid INTEGER NOT NULL,
    pid_start REAL, enqueued_at REAL NOT NULL, heartbeat_at REAL NOT NULL, wake TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    device_idx INTEGER PRIMARY KEY, lease_id TEXT NOT NULL UNIQUE, ticket INTEGER NOT NULL,
    holder TEXT NOT NULL, task_type TEXT NOT NULL, priority INTEGER NOT NULL, max_hold_s REAL,
    ttl_s REAL NOT NULL, node TEXT NOT NULL, pid INTEGER NOT NULL, pid_start REAL,
    enqueued_at REAL NOT NULL, granted_at REAL NOT NULL, heartbeat_at REAL NOT NULL,
    watchdog_at REAL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, task_type TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (name, task_type)
);
CREATE TABLE IF NOT EXISTS hist_sum (
    name TEXT NOT NULL, task_type TEXT NOT NULL, outcome TEXT NOT NULL, sum REAL NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (name, task_type, outcome)
);
"""

# Every ledger counter: the acquire outcomes, then the ones metrics.COUNTERS exports on their own.
COUNTER_HELP: dict[str, str] = {
    "acquired": "Requests granted a device.",
    "skipped": "Requests answered SKIPPED by their busy policy.",
    "fallback_cpu": "Requests answered FALLBACK_CPU by their busy policy.",
    **metrics.COUNTERS,
}


def connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    # WAL: readers (snapshot, metrics) never block the writer. synchronous=OFF: every commit is
    # still atomic and visible to every process at once, and survives any process crash; only an
    # OS crash or power cut can lose or corrupt it, and then no process holds a GPU anyway (a
    # corrupt file is moved aside at start). NORMAL would fsync at every WAL checkpoint, ~10 ms
    # stalls on a network disk that would land on whoever's grant triggers it.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    return conn


def pid_alive(pid: int, pid_start: float | None) -> bool:
    """Alive and the same process: a zombie is dead, and a recycled pid has another start time."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return pid_start is None or abs(proc.create_time() - pid_start) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by someone else: assume alive, the TTL still applies
        return True


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def own_start_time() -> float | None:
    try:
        return psutil.Process(os.getpid()).create_time()
    except psutil.Error:
        return None


def default_node_id() -> str:
    return os.environ.get("MLOC_NODE_ID") or socket.gethostname()


class LeaseStore:
    """The SQLite file, its flock, and the transactions every decision runs in.

    Safe across threads (one re-entrant lock) and across ``fork``: a child opens its own
    connection and lock descriptor instead of sharing its parent's.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.db_path = state_dir / DB_NAME
        self.lock = threading.RLock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending: list[metrics.Event] = []
        self.own_start = own_start_time()

    def _ensure_open(self) -> sqlite3.Connection:
        # A forked child must not reuse its parent's SQLite connection or flock descriptor (and must
        # not close them either: they are the parent's). It opens its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.own_start = own_start_time()
            self._conn = None
            self._lock_fd = None
            if fcntl is not None:
                self._lock_fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if self._conn is None:
            self._conn = connect(self.db_path)
        return self._conn

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the ledger entries it made reach the metrics once it commits."""
        with self.lock:
            conn = self._ensure_open()
            with self._flocked():
                self._pending = []
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    self._pending = []
                    raise
            events, self._pending = self._pending, []
        metrics.record(events)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            yield self._ensure_open()

    # -- the ledger -----------------------------------------------------------------------------

    def count(self, conn: sqlite3.Connection, name: str, task_type: str, n: float = 1) -> None:
        conn.execute(
            "INSERT INTO counters (name, task_type, value) VALUES (?, ?, ?) "
            "ON CONFLICT (name, task_type) DO UPDATE SET value = value + excluded.value",
            (name, task_type, n),
        )
        self._pending.append(metrics.Event(name, task_type, "", n))

    def observe(self, conn: sqlite3.Connection, name: str, task_type: str, outcome: str, value_ms: float) -> None:
        conn.execute(
            "INSERT INTO hist_sum (name, task_type, outcome, sum, count) VALUES (?, ?, ?, ?, 1) "
            "ON CONFLICT (name, task_type, outcome) DO UPDATE SET sum = sum + excluded.sum, count = count + 1",
            (name, task_type, outcome, value_ms),
        )
        self._pending.append(metrics.Event(name, task_type, outcome, value_ms))

    # -- inventory ------------------------------------------------------------------------------

    def register_inventory(
        self, devices: list[Device], nvml: NvmlBackend | None, mode: str, node_id: str, policies: dict[str, TaskPolicy]
    ) -> None:
        """Create the schema and write the node's devices; a corrupt file is moved aside first."""
        try:
            self._write_inventory(devices, nvml, mode, node_id, policies)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, busy, disk full: not corruption
                raise
            self._quarantine(exc)
            self._write_inventory(devices, nvml, mode, node_id, policies)

    def _quarantine(self, exc: sqlite3.DatabaseError) -> None:
        """Move a corrupt database aside (only an OS crash can cause one) and start afresh."""
        with self.lock, self._flocked():
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            suffix = time.strftime("%Y%m%dT%H%M%S")
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / name).rename(self.state_dir / f"{name}.corrupt-{suffix}")
            log.error("GPU arbiter database %s was unreadable (%s); moved aside, starting afresh", self.db_path, exc)

    def _write_inventory(
        self, devices: list[Device], nvml: NvmlBackend | None, mode: str, node_id: str, policies: dict[str, TaskPolicy]
    ) -> None:
        now = time.time()
        with self.txn() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            stored = [(r["idx"], r["uuid"]) for r in conn.execute("SELECT idx, uuid FROM devices ORDER BY idx")]
            mine = [(d.index, d.uuid) for d in devices]
            if stored and stored != mine:
                log.warning(
                    "GPU arbiter: device inventory in %s changes from %s to %s",
                    self.db_path,
                    [u for _, u in stored],
                    [u for _, u in mine],
                )
            if stored != mine:
                conn.execute("DELETE FROM devices")
            for d in devices:
                mem = read_memory(nvml, d)
                conn.execute(
                    "INSERT INTO devices (idx, uuid, name, kind, total_mb, free_mb, processes, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idx) DO UPDATE SET uuid = excluded.uuid, "
                    "name = excluded.name, kind = excluded.kind, total_mb = excluded.total_mb, "
                    "free_mb = excluded.free_mb, processes = excluded.processes, updated_at = excluded.updated_at",
                    (
                        d.index,
                        d.uuid,
                        d.name,
                        d.kind,
                        mem.total_mb if mem else d.total_mb,
                        mem.free_mb if mem else None,
                        mem.processes if mem else None,
                        now,
                    ),
                )
            meta = {
                "schema": SCHEMA_VERSION,
                "mode": mode,
                "node": node_id,
                "policies": json.dumps({k: policy_json(p) for k, p in policies.items()}),
            }
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(meta.items()),
            )

    def refresh_memory(self, devices: list[Device], nvml: NvmlBackend | None) -> None:
        """Store NVML's current free memory, so scrapes and other processes see fresh figures."""
        if nvml is None:
            return
        readings = [(d, read_memory(nvml, d)) for d in devices]
        with self.txn() as conn:
            conn.executemany(
                "UPDATE devices SET free_mb = ?, processes = ?, updated_at = ? WHERE idx = ? AND uuid = ?",
                [(m.free_mb, m.processes, time.time(), d.index, d.uuid) for d, m in readings if m is not None],
            )

    def close(self) -> None:
        with self.lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
            self._conn, self._lock_fd, self._pid = None, None, -1
