"""Node-local GPU arbiter: device leases shared by every process on one node.

Dagster runs every step in its own process, and Dagster's concurrency pool only counts slots. This
module decides *which* device a step gets, *whether* it gets one at all, and what happens when it
cannot have one. Everything lives in one SQLite file under the node's state directory:

- ``leases``  one row per held device. ``device_idx`` is the primary key, so the database itself
  refuses to grant a device twice, whatever the code above it does.
- ``queue``   one row per waiting request. Granting order is ``priority DESC, ticket ASC``
  (priority, then first come first served).
- ``counters``/``hist`` cumulative metrics, so that totals survive the processes that made them.

Every change runs in one ``BEGIN IMMEDIATE`` transaction, itself taken behind a kernel ``flock``:
contending processes are then woken by the kernel as soon as the lock is free, instead of by
SQLite's busy handler, which sleeps with a back-off of up to 100 ms and ruins tail latency.

Granting is a hand-off: whoever frees a device (a release, a reclaim) grants it to the best waiter
inside the same transaction and then pokes that waiter through a named pipe, so a waiter learns of
its grant in well under a millisecond, with a plain read and no lock, and no waiter can jump the
queue. Waiters also wake on a slow timer (0.5 s) to heartbeat their queue entry, reclaim devices
from dead holders, notice NVML memory changes, and give up at their deadline.

No Dagster imports here: the resource in ``mloc_dagster.resources.gpu`` is a thin shell over this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import selectors
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import psutil
from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

try:  # flock is POSIX only; elsewhere SQLite's own busy handler serializes writers.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

try:
    from pynvml import NVMLError as _NVMLError
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    _NVMLError = OSError  # type: ignore[assignment,misc]

# What NVML can throw at us: a missing library or driver, a GPU that fell off the bus.
NVML_ERRORS: tuple[type[BaseException], ...] = (_NVMLError, OSError, RuntimeError, ImportError)

log = logging.getLogger("mloc_dagster.arbiter")

DB_NAME = "arbiter.sqlite"
LOCK_NAME = "arbiter.lock"
METRICS_NAME = "arbiter.prom"
WAKE_DIR = "wake"
SCHEMA_VERSION = "1"


class TaskType(enum.StrEnum):
    """Kinds of GPU work in the asset graph. Any other string is accepted too (see ``policy_for``)."""

    TRAIN = "TRAIN"
    EVAL = "EVAL"
    MERGE = "MERGE"
    TTS_SYNTH = "TTS_SYNTH"
    OPTIONAL = "OPTIONAL"


class BusyPolicy(enum.StrEnum):
    """What a request does when no device can be had within ``max_wait_s`` (or the queue is full)."""

    WAIT = "WAIT"  # wait up to max_wait_s, then report TIMEOUT (or QUEUE_FULL)
    SKIP = "SKIP"  # report SKIPPED: the caller should not run the work at all
    FALLBACK_CPU = "FALLBACK_CPU"  # report FALLBACK_CPU: run on the CPU, without a lease


class Outcome(enum.StrEnum):
    ACQUIRED = "ACQUIRED"
    FALLBACK_CPU = "FALLBACK_CPU"
    SKIPPED = "SKIPPED"
    QUEUE_FULL = "QUEUE_FULL"
    TIMEOUT = "TIMEOUT"


class Reason(enum.StrEnum):
    """Why a request did not get a device; reported next to the outcome."""

    BUSY = "busy"  # max_wait_s was 0 and every device was held
    TIMEOUT = "timeout"  # waited max_wait_s
    QUEUE_FULL = "queue_full"  # queue_limit requests were already waiting
    INSUFFICIENT_MEMORY = "insufficient_memory"  # a device was free but had less than min_free_mb


@dataclass(frozen=True)
class TaskPolicy:
    """How one task type competes for devices.

    priority     0-100, higher is served first; equal priorities are served in arrival order.
    max_wait_s   how long to queue before the busy policy applies (0: decide at once).
    queue_limit  answer at once (QUEUE_FULL, or the busy policy) when this many requests already wait.
    busy_policy  WAIT -> TIMEOUT, SKIP -> SKIPPED, FALLBACK_CPU -> run on the CPU.
    max_hold_s   watchdog: a hold longer than this is logged and counted (the lease is kept:
                 killing a training step at minute 61 would waste the hour). None disables it.
    min_free_mb  a device qualifies only with this much free memory (NVML devices only).
    """

    priority: int = 50
    max_wait_s: float = 600.0
    queue_limit: int = 32
    busy_policy: BusyPolicy = BusyPolicy.WAIT
    max_hold_s: float | None = 3600.0
    min_free_mb: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "busy_policy", BusyPolicy(str(self.busy_policy).upper()))
        if not 0 <= self.priority <= 100:
            raise ValueError(f"priority must be in 0..100, got {self.priority}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, got {self.queue_limit}")
        if self.max_hold_s is not None and self.max_hold_s <= 0:
            raise ValueError(f"max_hold_s must be > 0 or None, got {self.max_hold_s}")
        if self.min_free_mb < 0:
            raise ValueError(f"min_free_mb must be >= 0, got {self.min_free_mb}")

    def replace(self, **changes: Any) -> TaskPolicy:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Defaults for the asset graph. Training is the product: it waits its turn (a step that gives up
# after minutes would just be retried). Evaluation and merging are short and also fine on a CPU, so
# they fall back rather than sit an hour behind a training job. Optional work never waits long.
DEFAULT_POLICIES: dict[str, TaskPolicy] = {
    TaskType.TRAIN: TaskPolicy(
        priority=50,
        max_wait_s=7200.0,
        queue_limit=32,
        busy_policy=BusyPolicy.WAIT,
        max_hold_s=4200.0,
        min_free_mb=2048,
    ),
    TaskType.EVAL: TaskPolicy(
        priority=70,
        max_wait_s=60.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=1800.0,
        min_free_mb=1024,
    ),
    TaskType.MERGE: TaskPolicy(
        priority=60,
        max_wait_s=30.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=900.0,
        min_free_mb=1024,
    ),
    TaskType.TTS_SYNTH: TaskPolicy(
        priority=65,
        max_wait_s=120.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=1800.0,
        min_free_mb=1024,
    ),
    TaskType.OPTIONAL: TaskPolicy(
        priority=10,
        max_wait_s=1.0,
        queue_limit=4,
        busy_policy=BusyPolicy.SKIP,
        max_hold_s=600.0,
        min_free_mb=512,
    ),
}
# Unknown task types behave like a patient, mid-priority job.
OTHER_POLICY = TaskPolicy(priority=50, max_wait_s=600.0, queue_limit=32, busy_policy=BusyPolicy.WAIT)


def normalize_task_type(task_type: TaskType | str) -> str:
    name = str(task_type).strip().upper()
    if not name:
        raise ValueError("task type must be a non-empty string")
    return name


def resolve_policies(
    overrides: Mapping[str, TaskPolicy | Mapping[str, Any]] | None = None,
) -> dict[str, TaskPolicy]:
    """Defaults with per-task-type overrides; a mapping override changes only the fields it names."""
    policies = dict(DEFAULT_POLICIES)
    for name, override in (overrides or {}).items():
        key = normalize_task_type(name)
        if isinstance(override, TaskPolicy):
            policies[key] = override
        else:
            policies[key] = policies.get(key, OTHER_POLICY).replace(**dict(override))
    return policies


# ---------------------------------------------------------------------------------------------
# Devices and NVML


@dataclass(frozen=True)
class Device:
    """A leasable device. ``kind`` is ``cuda`` (NVML), ``simulated`` or ``cpu`` (CPU mode slot)."""

    index: int
    uuid: str
    name: str
    kind: str
    total_mb: float | None = None

    @property
    def torch_device(self) -> str:
        # Simulated devices and CPU slots are exclusive tokens; the work itself runs on the CPU.
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        # For a child process: the UUID is stable whatever CUDA_DEVICE_ORDER says; "" hides all GPUs.
        return self.uuid if self.kind == "cuda" else ""


@dataclass(frozen=True)
class MemoryInfo:
    total_mb: float
    free_mb: float
    processes: int  # compute processes NVML sees on the device, ours or not


class NvmlBackend(Protocol):
    """The few NVML calls the arbiter needs; tests substitute a fake for the memory logic only."""

    def devices(self) -> list[Device]: ...

    def memory(self, index: int) -> MemoryInfo: ...


class PynvmlBackend:
    """NVML through ``nvidia-ml-py`` (``import pynvml``)."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    @classmethod
    def load(cls) -> tuple[PynvmlBackend | None, str]:
        """The backend, or None and the reason it is unavailable (no library, no driver, no GPU)."""
        try:
            backend = cls()
        except NVML_ERRORS as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            return None, f"NVML unavailable ({type(exc).__name__}: {exc})"
        if not backend._handles:
            return None, "NVML reports no GPU"
        return backend, "NVML"

    def devices(self) -> list[Device]:
        found = []
        for index, handle in enumerate(self._handles):
            uuid_ = _text(self._nvml.nvmlDeviceGetUUID(handle))
            name = _text(self._nvml.nvmlDeviceGetName(handle))
            total = self._nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
            found.append(Device(index=index, uuid=uuid_, name=name, kind="cuda", total_mb=total))
        return found

    def memory(self, index: int) -> MemoryInfo:
        handle = self._handles[index]
        info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            processes = len(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except NVML_ERRORS:  # not supported on some drivers / vGPUs: count nothing rather than fail
            processes = 0
        return MemoryInfo(total_mb=info.total / 2**20, free_mb=info.free / 2**20, processes=processes)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_cpu_mode_announced = False


def _announce_cpu_mode(reason: str, slots: int) -> None:
    global _cpu_mode_announced
    if not _cpu_mode_announced:
        _cpu_mode_announced = True
        log.warning(
            "GPU arbiter in CPU mode: %s. %d CPU slot(s) are leased instead of GPUs; every policy "
            "still applies and work runs on torch device 'cpu'.",
            reason,
            slots,
        )


# ---------------------------------------------------------------------------------------------
# Leases


@dataclass(eq=False)
class Lease:
    """The answer to one request. Use it as a context manager to release the device on exit.

    ``torch_device`` is None when the work should not run here (SKIPPED, TIMEOUT, QUEUE_FULL).
    ``cuda_visible_devices`` is the value a child process should get ("" hides every GPU).
    ``hold_ms`` is set by ``release()``; ``lost`` means the lease was reclaimed while held
    (heartbeat older than the TTL, e.g. a frozen process) and the device may be in use by another.
    """

    outcome: Outcome
    task_type: str
    holder: str
    policy: TaskPolicy
    lease_id: str
    reason: Reason | None = None
    device_index: int | None = None
    device_uuid: str | None = None
    device_kind: str | None = None
    torch_device: str | None = None
    cuda_visible_devices: str | None = None
    wait_ms: float = 0.0
    hold_ms: float | None = None
    granted_at: float | None = None  # wall clock, written inside the granting transaction
    enqueued_at: float | None = None  # wall clock, written inside the enqueuing transaction
    ticket: int | None = None
    watchdog_exceeded: bool = False
    lost: bool = False
    _arbiter: Arbiter | None = field(default=None, repr=False)
    _started: float = field(default_factory=time.monotonic, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def acquired(self) -> bool:
        return self.outcome is Outcome.ACQUIRED

    @property
    def runnable(self) -> bool:
        """True when the caller may run the work (on ``torch_device``)."""
        return self.outcome in (Outcome.ACQUIRED, Outcome.FALLBACK_CPU)

    def release(self) -> None:
        """Give the device back (idempotent). Non-acquired outcomes just record their run time."""
        if self._released:
            return
        self._released = True
        self.hold_ms = (time.monotonic() - self._started) * 1000.0
        if self.acquired and self._arbiter is not None:
            self._arbiter._release(self)

    def metadata(self) -> dict[str, str | float | bool]:
        """Flat, JSON-able metadata for a step's MaterializeResult."""
        if self.outcome is Outcome.ACQUIRED:
            device = self.device_uuid or "none"
        elif self.outcome is Outcome.FALLBACK_CPU:
            device = "cpu"
        else:
            device = "none"
        meta: dict[str, str | float | bool] = {
            "gpu/outcome": self.outcome.value,
            "gpu/task_type": self.task_type,
            "gpu/device": device,
            "gpu/torch_device": self.torch_device or "none",
            "gpu/wait_ms": round(self.wait_ms, 3),
        }
        if self.hold_ms is not None:
            meta["gpu/hold_ms"] = round(self.hold_ms, 3)
        if self.reason is not None:
            meta["gpu/reason"] = self.reason.value
        if self.watchdog_exceeded:
            meta["gpu/watchdog_exceeded"] = True
        if self.lost:
            meta["gpu/lost"] = True
        return meta

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Held:
    lease: Lease
    on_watchdog: Callable[[Lease], None] | None
    watchdog_at: float  # monotonic; inf when there is none or it has fired


class _Keeper(threading.Thread):
    """One thread per arbiter and process: heartbeats every held lease and fires watchdogs on time.

    One shared thread rather than one per lease keeps thread start and join off the
    acquire/release path.
    """

    def __init__(self, arbiter: Arbiter) -> None:
        super().__init__(name="gpu-arbiter-keeper", daemon=True)
        self._arbiter = arbiter
        self._held: dict[str, _Held] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._planned_wake = -math.inf  # monotonic time the thread will wake up next

    def add(self, lease: Lease, on_watchdog: Callable[[Lease], None] | None) -> None:
        max_hold = lease.policy.max_hold_s
        held = _Held(lease, on_watchdog, lease._started + max_hold if max_hold else math.inf)
        with self._cond:
            self._held[lease.lease_id] = held
            # Waking the thread costs a GIL hand-off on the acquire path: only do it when this
            # lease's watchdog is due before the thread's next wake-up anyway. Heartbeats need no
            # wake-up: the grant set the heartbeat, and the next beat is less than a TTL away.
            if held.watchdog_at < self._planned_wake:
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._held.pop(lease.lease_id, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        interval = self._arbiter.heartbeat_ttl_s / 3.0
        next_beat = time.monotonic() + interval
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if next_beat <= now and not self._held:
                        next_beat = now + interval  # nothing to beat for: just plan the next round
                    wake_at = min([next_beat, *(h.watchdog_at for h in self._held.values())])
                    if now >= wake_at:
                        break
                    self._planned_wake = wake_at
                    self._cond.wait(wake_at - now)
                held = list(self._held.values())
            try:  # outside the condition: the transaction may wait for the lock
                alive, fired = self._arbiter._heartbeat([h.lease.lease_id for h in held])
            except sqlite3.Error as exc:  # a transient problem must not kill the heartbeat
                log.warning("GPU lease heartbeat failed: %s", exc)
                next_beat = time.monotonic() + min(1.0, interval)
                continue
            next_beat = time.monotonic() + interval
            for h in held:
                self._after_beat(h, h.lease.lease_id in alive, h.lease.lease_id in fired)

    def _after_beat(self, h: _Held, alive: bool, fired: bool) -> None:
        lease = h.lease
        with self._cond:
            if lease.lease_id not in self._held:  # released meanwhile: nothing to report
                return
            if not alive:
                self._held.pop(lease.lease_id)
        if not alive:
            lease.lost = True
            log.error(
                "GPU lease %s (%s on %s) was reclaimed while held: its heartbeat was older than %.0f s",
                lease.lease_id[:8],
                lease.holder,
                lease.device_uuid,
                self._arbiter.heartbeat_ttl_s,
            )
            return
        if fired and not lease.watchdog_exceeded:
            lease.watchdog_exceeded = True
            if h.on_watchdog is not None:
                try:
                    h.on_watchdog(lease)
                except Exception:
                    log.exception("GPU lease watchdog callback failed")
        if time.monotonic() >= h.watchdog_at:
            h.watchdog_at = math.inf


# ---------------------------------------------------------------------------------------------
# Waking waiters


class _Waker:
    """A named pipe a waiting thread sleeps on; a granting process writes a byte to wake it at once.

    One per thread and arbiter, reused across requests: creating a FIFO per request costs more
    than the rest of an uncontended acquire.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path)
        # Opened non-blocking for reading, plus a writer of our own: with no writer at all, poll()
        # reports end-of-file forever and the waiter would spin.
        self._rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._rfd, selectors.EVENT_READ)

    @classmethod
    def create(cls, path: Path) -> _Waker | None:
        if not hasattr(os, "mkfifo"):
            return None
        try:
            return cls(path)
        except OSError as exc:  # a file system without FIFOs: fall back to fast polling
            log.debug("no wake-up pipe (%s); polling instead", exc)
            return None

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._rfd, 4096):
                pass

    def wait(self, timeout_s: float) -> bool:
        ready = bool(self._selector.select(max(0.0, timeout_s)))
        if ready:
            self.drain()
        return ready

    def close(self) -> None:
        self._selector.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()


# A grant made in a transaction: the lease id and the waiter's wake-up pipe, if it has one.
_Grant = tuple[str, str | None]


def _wake(path: str | None) -> None:
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # gone, or nobody listening: the waiter's poll timer covers it
        return
    try:
        os.write(fd, b"!")
    except OSError:  # pipe full: the waiter has wake-ups pending already
        pass
    finally:
        os.close(fd)


def _clean_stale_wakers(directory: Path) -> None:
    """Remove wake-up pipes left by processes that died (names start with the pid)."""
    for path in directory.glob("*.fifo"):
        pid_text = path.name.split("-", 1)[0]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            with contextlib.suppress(OSError):
                path.unlink()


# ---------------------------------------------------------------------------------------------
# Storage

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS hist (
    name TEXT NOT NULL, task_type TEXT NOT NULL, outcome TEXT NOT NULL, bucket INTEGER NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (name, task_type, outcome, bucket)
);
CREATE TABLE IF NOT EXISTS hist_sum (
    name TEXT NOT NULL, task_type TEXT NOT NULL, outcome TEXT NOT NULL, sum REAL NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (name, task_type, outcome)
);
"""

# Milliseconds; spans a sub-millisecond hand-off up to a two-hour training hold.
BUCKETS_MS: tuple[float, ...] = (
    1,
    2.5,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    math.inf,
)

COUNTER_HELP: dict[str, str] = {
    "acquired": "Requests granted a device.",
    "skipped": "Requests answered SKIPPED by their busy policy.",
    "fallback_cpu": "Requests answered FALLBACK_CPU by their busy policy.",
    "timeouts": "Requests that got no device within max_wait_s (any busy policy).",
    "queue_full": "Requests refused at once because queue_limit requests were waiting.",
    "watchdog_exceeded": "Leases held longer than their task type's max_hold_s.",
    "reclaimed": "Leases taken back from a dead holder or after a stale heartbeat.",
    "dropped_waiters": "Queue entries dropped because their process died or went silent.",
    "released": "Leases released by their holder.",
}


def _connect(db_path: Path) -> sqlite3.Connection:
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


def _count(conn: sqlite3.Connection, name: str, task_type: str, n: float = 1) -> None:
    conn.execute(
        "INSERT INTO counters (name, task_type, value) VALUES (?, ?, ?) "
        "ON CONFLICT (name, task_type) DO UPDATE SET value = value + excluded.value",
        (name, task_type, n),
    )


def _observe(conn: sqlite3.Connection, name: str, task_type: str, outcome: str, value_ms: float) -> None:
    bucket = next(i for i, le in enumerate(BUCKETS_MS) if value_ms <= le)
    conn.execute(
        "INSERT INTO hist (name, task_type, outcome, bucket, count) VALUES (?, ?, ?, ?, 1) "
        "ON CONFLICT (name, task_type, outcome, bucket) DO UPDATE SET count = count + 1",
        (name, task_type, outcome, bucket),
    )
    conn.execute(
        "INSERT INTO hist_sum (name, task_type, outcome, sum, count) VALUES (?, ?, ?, ?, 1) "
        "ON CONFLICT (name, task_type, outcome) DO UPDATE SET sum = sum + excluded.sum, count = count + 1",
        (name, task_type, outcome, value_ms),
    )


def _pid_alive(pid: int, pid_start: float | None) -> bool:
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


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _own_start_time() -> float | None:
    try:
        return psutil.Process(os.getpid()).create_time()
    except psutil.Error:
        return None


def default_node_id() -> str:
    return os.environ.get("MLOC_NODE_ID") or socket.gethostname()


# ---------------------------------------------------------------------------------------------
# The arbiter


class Arbiter:
    """Leases devices of this node to processes that share ``state_dir``.

    Devices: NVML GPUs when NVML works; else ``simulated_devices`` exclusive tokens when that is
    > 0 (tests, GPU-less nodes that still want serialization); else CPU mode with ``cpu_slots``
    CPU slots (default 1, so two TRAIN steps never share the CPU either). ``simulated_devices > 0``
    takes precedence over real GPUs. The device inventory is node-wide: the last arbiter to start
    on ``state_dir`` writes it.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        simulated_devices: int = 0,
        cpu_slots: int = 1,
        policies: Mapping[str, TaskPolicy | Mapping[str, Any]] | None = None,
        heartbeat_ttl_s: float = 30.0,
        poll_interval_s: float | None = None,
        liveness_interval_s: float = 0.5,
        node_id: str | None = None,
        nvml: NvmlBackend | None = None,
        use_nvml: bool = True,
        metrics_textfile: bool = True,
        metrics_interval_s: float = 1.0,
    ) -> None:
        if heartbeat_ttl_s < 0.3:
            raise ValueError("heartbeat_ttl_s must be >= 0.3 s")
        if simulated_devices < 0 or cpu_slots < 1:
            raise ValueError("simulated_devices must be >= 0 and cpu_slots >= 1")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / DB_NAME
        self.metrics_path = self.state_dir / METRICS_NAME
        self.wake_dir = self.state_dir / WAKE_DIR
        self.wake_dir.mkdir(exist_ok=True)
        self.policies = resolve_policies(policies)
        self.heartbeat_ttl_s = float(heartbeat_ttl_s)
        self.node_id = node_id or default_node_id()
        self.liveness_interval_s = liveness_interval_s
        self.metrics_textfile = metrics_textfile
        self.metrics_interval_s = metrics_interval_s
        self._explicit_poll_s = poll_interval_s

        self._nvml: NvmlBackend | None = None
        if simulated_devices > 0:
            self.mode = "simulated"
            self.devices = [
                Device(index=i, uuid=f"SIM-{i}", name=f"simulated device {i}", kind="simulated")
                for i in range(simulated_devices)
            ]
        else:
            reason = "NVML disabled"
            if nvml is not None:
                self._nvml, reason = nvml, "NVML (injected)"
            elif use_nvml:
                self._nvml, reason = PynvmlBackend.load()
            if self._nvml is not None:
                self.mode = "nvml"
                self.devices = self._nvml.devices()
            else:
                self.mode = "cpu"
                self.devices = [
                    Device(index=i, uuid=f"CPU-{i}", name=f"cpu slot {i}", kind="cpu")
                    for i in range(cpu_slots)
                ]
                _announce_cpu_mode(reason, cpu_slots)

        self._tlock = threading.RLock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._last_liveness = 0.0
        self._last_metrics = -math.inf
        self._mem_blocked: set[str] = set()
        self._wakers: dict[tuple[int, int], _Waker | None] = {}
        self._keeper: _Keeper | None = None
        self._keeper_pid = -1
        self._own_start = _own_start_time()
        self.registry = CollectorRegistry()
        self.registry.register(_DbCollector(self))
        self._register_inventory()
        _clean_stale_wakers(self.wake_dir)

    # -- connection and transactions ----------------------------------------------------------

    def _ensure_open(self) -> sqlite3.Connection:
        # A forked child must not reuse its parent's SQLite connection or flock descriptor (and must
        # not close them either: they are the parent's). It opens its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._own_start = _own_start_time()
            self._conn = None
            self._lock_fd = None
            if fcntl is not None:
                self._lock_fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if self._conn is None:
            self._conn = _connect(self.db_path)
        return self._conn

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._tlock:
            conn = self._ensure_open()
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._tlock:
            yield self._ensure_open()

    def _register_inventory(self) -> None:
        try:
            self._write_inventory()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, busy, disk full: not corruption
                raise
            self._quarantine_database(exc)
            self._write_inventory()

    def _quarantine_database(self, exc: sqlite3.DatabaseError) -> None:
        """Move a corrupt database aside (only an OS crash can cause one) and start afresh."""
        with self._tlock:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                suffix = time.strftime("%Y%m%dT%H%M%S")
                for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.state_dir / name).rename(self.state_dir / f"{name}.corrupt-{suffix}")
                log.error(
                    "GPU arbiter database %s was unreadable (%s); moved aside, starting afresh",
                    self.db_path,
                    exc,
                )
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write_inventory(self) -> None:
        now = time.time()
        with self._txn() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            stored = [
                (r["idx"], r["uuid"]) for r in conn.execute("SELECT idx, uuid FROM devices ORDER BY idx")
            ]
            mine = [(d.index, d.uuid) for d in self.devices]
            if stored and stored != mine:
                log.warning(
                    "GPU arbiter: device inventory in %s changes from %s to %s",
                    self.db_path,
                    [u for _, u in stored],
                    [u for _, u in mine],
                )
            if stored != mine:
                conn.execute("DELETE FROM devices")
            for d in self.devices:
                mem = self._memory(d)
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
                "mode": self.mode,
                "node": self.node_id,
                "policies": json.dumps({k: _policy_json(p) for k, p in self.policies.items()}),
            }
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(meta.items()),
            )

    def _memory(self, device: Device) -> MemoryInfo | None:
        if device.kind != "cuda" or self._nvml is None:
            return None
        try:
            return self._nvml.memory(device.index)
        except NVML_ERRORS as exc:  # a GPU that fell off the bus must not wedge the arbiter
            log.warning("NVML memory query for device %d failed: %s", device.index, exc)
            return None

    # -- policy ---------------------------------------------------------------------------------

    def policy_for(self, task_type: TaskType | str) -> TaskPolicy:
        return self.policies.get(normalize_task_type(task_type), OTHER_POLICY)

    # -- maintenance: reclaim, watchdog, grant --------------------------------------------------

    def _maintain(self, conn: sqlite3.Connection, now: float, grant: bool = True) -> list[_Grant]:
        """Reclaim stale leases, drop silent waiters, fire watchdogs, hand free devices out.

        Returns the grants made, whose waiters are to be woken after commit.
        """
        for row in conn.execute("SELECT * FROM leases WHERE heartbeat_at + ttl_s < ?", (now,)).fetchall():
            self._reclaim(conn, row, f"heartbeat older than {row['ttl_s']:.1f} s")
        for row in conn.execute("SELECT * FROM queue WHERE heartbeat_at + ttl_s < ?", (now,)).fetchall():
            # Its process is silent (frozen, or on another node): if it wakes up, it queues again.
            conn.execute("DELETE FROM queue WHERE ticket = ?", (row["ticket"],))
            _count(conn, "dropped_waiters", row["task_type"])
            log.warning("GPU arbiter dropped waiter %s: no heartbeat for %.1f s", row["holder"], row["ttl_s"])

        for row in conn.execute(
            "SELECT lease_id, holder, task_type, device_idx, granted_at, max_hold_s FROM leases "
            "WHERE watchdog_at IS NULL AND max_hold_s IS NOT NULL AND granted_at + max_hold_s <= ?",
            (now,),
        ).fetchall():
            conn.execute("UPDATE leases SET watchdog_at = ? WHERE lease_id = ?", (now, row["lease_id"]))
            _count(conn, "watchdog_exceeded", row["task_type"])
            log.warning(
                "GPU watchdog: %s (%s) has held device %d for %.0f s, over max_hold_s=%.0f s",
                row["holder"],
                row["task_type"],
                row["device_idx"],
                now - row["granted_at"],
                row["max_hold_s"],
            )

        return self._grant_pass(conn, now) if grant else []

    def _liveness_pass(self) -> None:
        """Reclaim leases and queue entries of processes on this node that died.

        The pid checks (a /proc read or two each) run outside the write lock, and at most one
        process per node runs them per liveness interval, so they never sit on a grant's path.
        """
        mono = time.monotonic()
        if mono - self._last_liveness < self.liveness_interval_s:
            return
        self._last_liveness = mono
        now = time.time()
        with self._read() as conn:
            last = conn.execute("SELECT value FROM meta WHERE key = 'liveness_at'").fetchone()
            if last is not None and now - float(last[0]) < self.liveness_interval_s:
                return
            leases = conn.execute(
                "SELECT lease_id, pid, pid_start FROM leases WHERE node = ?", (self.node_id,)
            )
            dead_leases = [
                r["lease_id"] for r in leases.fetchall() if not _pid_alive(r["pid"], r["pid_start"])
            ]
            waiters = conn.execute(
                "SELECT lease_id, pid, pid_start FROM queue WHERE node = ?", (self.node_id,)
            )
            dead_waiters = [
                r["lease_id"] for r in waiters.fetchall() if not _pid_alive(r["pid"], r["pid_start"])
            ]
        others: list[_Grant] = []
        with self._txn() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('liveness_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(now),),
            )
            for lease_id in dead_leases:
                row = conn.execute("SELECT * FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
                if row is not None:
                    self._reclaim(conn, row, f"holder pid {row['pid']} is dead")
            for lease_id in dead_waiters:
                row = conn.execute("SELECT * FROM queue WHERE lease_id = ?", (lease_id,)).fetchone()
                if row is not None:
                    self._drop_waiter(conn, row)
            if dead_leases or dead_waiters:
                others = self._grant_pass(conn, time.time())
        self._wake_all(others)

    def _drop_waiter(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        conn.execute("DELETE FROM queue WHERE ticket = ?", (row["ticket"],))
        _count(conn, "dropped_waiters", row["task_type"])
        if row["wake"]:
            with contextlib.suppress(OSError):
                Path(row["wake"]).unlink()
        log.warning("GPU arbiter dropped waiter %s: pid %d is dead", row["holder"], row["pid"])

    def _reclaim(self, conn: sqlite3.Connection, row: sqlite3.Row, why: str) -> None:
        conn.execute("DELETE FROM leases WHERE lease_id = ?", (row["lease_id"],))
        _count(conn, "reclaimed", row["task_type"])
        log.warning(
            "GPU arbiter reclaimed device %d from %s (%s, pid %d on %s): %s",
            row["device_idx"],
            row["holder"],
            row["task_type"],
            row["pid"],
            row["node"],
            why,
        )

    def _grant_pass(self, conn: sqlite3.Connection, now: float) -> list[_Grant]:
        self._mem_blocked.clear()
        waiters = conn.execute("SELECT * FROM queue ORDER BY priority DESC, ticket ASC").fetchall()
        if not waiters:
            return []
        held = {r[0] for r in conn.execute("SELECT device_idx FROM leases")}
        free = [
            Device(index=r["idx"], uuid=r["uuid"], name=r["name"], kind=r["kind"], total_mb=r["total_mb"])
            for r in conn.execute("SELECT * FROM devices ORDER BY idx")
            if r["idx"] not in held
        ]
        if not free:
            return []
        memory = {d.index: self._memory(d) for d in free}
        granted: list[_Grant] = []
        for w in waiters:
            if not free:
                break
            # A cheap existence check per grant: a device handed to a dead waiter would sit idle
            # until the next liveness pass (which also catches zombies and recycled pids).
            if w["node"] == self.node_id and not _pid_exists(w["pid"]):
                self._drop_waiter(conn, w)
                continue
            fits = [d for d in free if memory[d.index] is None or memory[d.index].free_mb >= w["min_free_mb"]]
            if not fits:
                # Backfill: a device the head of the queue cannot use (too little free memory) may
                # still serve a smaller request further down.
                self._mem_blocked.add(w["lease_id"])
                continue
            # Fewest processes already on the device (ours are excluded: it is free), then most
            # free memory, then lowest index.
            best = min(
                fits,
                key=lambda d: (
                    memory[d.index].processes if memory[d.index] else 0,
                    -(memory[d.index].free_mb if memory[d.index] else 0.0),
                    d.index,
                ),
            )
            conn.execute(
                "INSERT INTO leases (device_idx, lease_id, ticket, holder, task_type, priority, max_hold_s, "
                "ttl_s, node, pid, pid_start, enqueued_at, granted_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    best.index,
                    w["lease_id"],
                    w["ticket"],
                    w["holder"],
                    w["task_type"],
                    w["priority"],
                    w["max_hold_s"],
                    w["ttl_s"],
                    w["node"],
                    w["pid"],
                    w["pid_start"],
                    w["enqueued_at"],
                    now,
                    now,
                ),
            )
            conn.execute("DELETE FROM queue WHERE ticket = ?", (w["ticket"],))
            _count(conn, "acquired", w["task_type"])
            _observe(conn, "wait_ms", w["task_type"], Outcome.ACQUIRED, (now - w["enqueued_at"]) * 1000.0)
            free.remove(best)
            granted.append((w["lease_id"], w["wake"]))
        return granted

    def _wake_all(self, grants: list[_Grant], except_id: str | None = None) -> None:
        for lease_id, wake in grants:
            if lease_id != except_id:
                _wake(wake)

    def _waker(self) -> _Waker | None:
        key = (os.getpid(), threading.get_ident())
        if key not in self._wakers:
            self._wakers[key] = _Waker.create(self.wake_dir / f"{key[0]}-{key[1]}-{id(self):x}.fifo")
        return self._wakers[key]

    def _keeper_thread(self) -> _Keeper:
        with self._tlock:
            if self._keeper is None or self._keeper_pid != os.getpid():  # threads do not survive fork
                self._keeper = _Keeper(self)
                self._keeper_pid = os.getpid()
                self._keeper.start()
            return self._keeper

    # -- acquire / release ----------------------------------------------------------------------

    def acquire(
        self,
        task_type: TaskType | str,
        holder: str | None = None,
        *,
        priority: int | None = None,
        max_wait_s: float | None = None,
        busy_policy: BusyPolicy | str | None = None,
        queue_limit: int | None = None,
        min_free_mb: int | None = None,
        max_hold_s: float | None = None,
        on_watchdog: Callable[[Lease], None] | None = None,
    ) -> Lease:
        """Ask for a device for ``task_type``; keyword arguments override its policy for this call.

        Always returns a Lease; look at ``lease.outcome``. Never raises because devices are busy.
        """
        task = normalize_task_type(task_type)
        policy = self.policy_for(task).replace(
            priority=priority,
            max_wait_s=max_wait_s,
            queue_limit=queue_limit,
            min_free_mb=min_free_mb,
            max_hold_s=max_hold_s,
            busy_policy=BusyPolicy(str(busy_policy).upper()) if busy_policy else None,
        )
        holder = holder or f"{self.node_id}:{os.getpid()}:{threading.current_thread().name}"
        lease_id = uuid.uuid4().hex
        started = time.monotonic()
        deadline = started + policy.max_wait_s
        waker = self._waker() if policy.max_wait_s > 0 else None
        if waker is not None:
            waker.drain()  # wake-ups left over from an earlier request of this thread
        # The wake-up pipe announces grants; the timer (maintain_every_s) covers dead holders,
        # memory changes and the queue heartbeat. Without a pipe, grants are found by polling.
        maintain_every_s = min(self._explicit_poll_s or 0.5, self.heartbeat_ttl_s / 3.0)
        check_every_s = maintain_every_s if waker else min(0.02, maintain_every_s)
        wake = str(waker.path) if waker is not None else None
        self._liveness_pass()
        try:
            with self._txn() as conn:
                now = time.time()
                others = self._maintain(conn, now, grant=False)
                waiting = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                if waiting >= policy.queue_limit:
                    # Devices may have just been freed by the maintenance: serve the queue first.
                    others += self._grant_pass(conn, now)
                    waiting = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                if waiting >= policy.queue_limit:
                    lease = self._decide_busy(
                        conn, task, holder, policy, lease_id, started, Reason.QUEUE_FULL
                    )
                else:
                    self._enqueue(conn, lease_id, holder, task, policy, now, wake)
                    others += self._grant_pass(conn, now)
                    lease = self._collect_grant(conn, task, holder, policy, lease_id, started)
                    if lease is None and policy.max_wait_s <= 0:
                        conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                        reason = Reason.INSUFFICIENT_MEMORY if lease_id in self._mem_blocked else Reason.BUSY
                        lease = self._decide_busy(conn, task, holder, policy, lease_id, started, reason)
            self._wake_all(others, except_id=lease_id)

            # Waiting costs no lock: a grant is written by whoever freed the device, and reading our
            # own lease row is a plain WAL read. Every maintain_every_s (and at the deadline) we take
            # the write lock to heartbeat our queue entry, reclaim dead holders, and give up in time.
            next_maintain = started + maintain_every_s
            while lease is None:
                now_m = time.monotonic()
                timeout_s = min(next_maintain, deadline) - now_m
                if waker is not None:
                    waker.wait(timeout_s)
                else:
                    time.sleep(max(0.0, min(check_every_s, timeout_s)))
                with self._read() as conn:
                    lease = self._collect_grant(conn, task, holder, policy, lease_id, started)
                now_m = time.monotonic()
                if lease is not None or (now_m < next_maintain and now_m < deadline):
                    continue
                next_maintain = now_m + maintain_every_s
                self._liveness_pass()
                with self._txn() as conn:
                    now = time.time()
                    others = self._maintain(conn, now)
                    lease = self._collect_grant(conn, task, holder, policy, lease_id, started)
                    if lease is None:
                        queued = conn.execute(
                            "UPDATE queue SET heartbeat_at = ? WHERE lease_id = ?", (now, lease_id)
                        ).rowcount
                        if time.monotonic() >= deadline:
                            conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                            memory = lease_id in self._mem_blocked
                            reason = Reason.INSUFFICIENT_MEMORY if memory else Reason.TIMEOUT
                            lease = self._decide_busy(conn, task, holder, policy, lease_id, started, reason)
                        elif not queued:
                            # Our queue entry outlived its TTL (this process was starved of CPU):
                            # queue again rather than wait for a grant that cannot come.
                            log.warning("GPU request %s lost its queue entry; queueing again", holder)
                            self._enqueue(conn, lease_id, holder, task, policy, now, wake)
                self._wake_all(others, except_id=lease_id)
        except BaseException:
            # Interrupted (run terminated, Ctrl-C): leave no queue entry or unclaimed grant behind.
            self._abandon(lease_id)
            raise

        if lease.acquired:
            self._keeper_thread().add(lease, on_watchdog)
        self._maybe_write_metrics()
        return lease

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        lease_id: str,
        holder: str,
        task: str,
        policy: TaskPolicy,
        now: float,
        wake: str | None,
    ) -> None:
        conn.execute(
            "INSERT INTO queue (lease_id, holder, task_type, priority, min_free_mb, max_hold_s, ttl_s, node, "
            "pid, pid_start, enqueued_at, heartbeat_at, wake) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                lease_id,
                holder,
                task,
                policy.priority,
                policy.min_free_mb,
                policy.max_hold_s,
                self.heartbeat_ttl_s,
                self.node_id,
                os.getpid(),
                self._own_start,
                now,
                now,
                wake,
            ),
        )

    def _abandon(self, lease_id: str) -> None:
        try:
            with self._txn() as conn:
                conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))
                others = self._grant_pass(conn, time.time())
            self._wake_all(others)
        except sqlite3.Error as exc:  # the TTL and the pid check clean up after us anyway
            log.warning("could not withdraw GPU request %s: %s", lease_id[:8], exc)

    def _collect_grant(
        self,
        conn: sqlite3.Connection,
        task: str,
        holder: str,
        policy: TaskPolicy,
        lease_id: str,
        started: float,
    ) -> Lease | None:
        row = conn.execute(
            "SELECT l.*, d.uuid, d.kind, d.name, d.total_mb FROM leases l "
            "LEFT JOIN devices d ON d.idx = l.device_idx WHERE l.lease_id = ?",
            (lease_id,),
        ).fetchone()
        if row is None:
            return None
        now_mono = time.monotonic()
        wait_ms = (now_mono - started) * 1000.0
        device = Device(
            index=row["device_idx"],
            uuid=row["uuid"] or f"DEV-{row['device_idx']}",
            name=row["name"] or "",
            kind=row["kind"] or "simulated",
        )
        # Read-only on purpose: the granting transaction already counted the grant and started the
        # heartbeat clock, so noticing a grant takes no write lock.
        return Lease(
            outcome=Outcome.ACQUIRED,
            task_type=task,
            holder=holder,
            policy=policy,
            lease_id=lease_id,
            device_index=device.index,
            device_uuid=device.uuid,
            device_kind=device.kind,
            torch_device=device.torch_device,
            cuda_visible_devices=device.cuda_visible_devices,
            wait_ms=wait_ms,
            granted_at=row["granted_at"],
            enqueued_at=row["enqueued_at"],
            ticket=row["ticket"],
            _arbiter=self,
            _started=now_mono,
        )

    def _decide_busy(
        self,
        conn: sqlite3.Connection,
        task: str,
        holder: str,
        policy: TaskPolicy,
        lease_id: str,
        started: float,
        reason: Reason,
    ) -> Lease:
        if reason is Reason.QUEUE_FULL:
            _count(conn, "queue_full", task)
        else:
            _count(conn, "timeouts", task)
        if policy.busy_policy is BusyPolicy.SKIP:
            outcome = Outcome.SKIPPED
            _count(conn, "skipped", task)
        elif policy.busy_policy is BusyPolicy.FALLBACK_CPU:
            outcome = Outcome.FALLBACK_CPU
            _count(conn, "fallback_cpu", task)
        else:
            outcome = Outcome.QUEUE_FULL if reason is Reason.QUEUE_FULL else Outcome.TIMEOUT
        wait_ms = (time.monotonic() - started) * 1000.0
        _observe(conn, "wait_ms", task, outcome, wait_ms)
        log.info(
            "GPU request %s (%s): %s after %.0f ms (%s)", holder, task, outcome.value, wait_ms, reason.value
        )
        cpu = outcome is Outcome.FALLBACK_CPU
        return Lease(
            outcome=outcome,
            task_type=task,
            holder=holder,
            policy=policy,
            lease_id=lease_id,
            reason=reason,
            torch_device="cpu" if cpu else None,
            cuda_visible_devices="" if cpu else None,
            device_kind="cpu" if cpu else None,
            wait_ms=wait_ms,
            _arbiter=self,
        )

    def _release(self, lease: Lease) -> None:
        if self._keeper is not None:
            self._keeper.remove(lease)
        if lease.device_kind == "cuda":
            _free_torch_cuda_cache()
        with self._txn() as conn:
            gone = conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease.lease_id,)).rowcount == 0
            if gone:
                lease.lost = True
            else:
                _count(conn, "released", lease.task_type)
                _observe(conn, "hold_ms", lease.task_type, "", lease.hold_ms or 0.0)
            others = self._maintain(conn, time.time())
        self._wake_all(others)
        if gone:
            log.error(
                "GPU lease %s of %s had been reclaimed before release (hold %.0f ms)",
                lease.lease_id[:8],
                lease.holder,
                lease.hold_ms or 0.0,
            )
        self._maybe_write_metrics()

    def _heartbeat(self, lease_ids: list[str]) -> tuple[set[str], set[str]]:
        """Refresh heartbeats; returns the ids still held and the ids whose watchdog has fired."""
        self._liveness_pass()
        with self._txn() as conn:
            now = time.time()
            others = self._maintain(conn, now)
            conn.executemany(
                "UPDATE leases SET heartbeat_at = ? WHERE lease_id = ?", [(now, i) for i in lease_ids]
            )
            marks = ",".join("?" * len(lease_ids))
            rows = conn.execute(
                f"SELECT lease_id, watchdog_at FROM leases WHERE lease_id IN ({marks})", lease_ids
            ).fetchall()
        self._wake_all(others)
        return {r["lease_id"] for r in rows}, {r["lease_id"] for r in rows if r["watchdog_at"] is not None}

    # -- observability --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Devices (with live memory), leases, queue in granting order, counters and histograms."""
        with self._read() as conn:
            return _snapshot(conn, self.db_path, self._nvml, self.metrics_path)

    def write_metrics(self) -> Path:
        """Write the Prometheus text file (node-exporter textfile collector format)."""
        self._refresh_memory()
        write_to_textfile(str(self.metrics_path), self.registry)
        self._last_metrics = time.monotonic()
        return self.metrics_path

    def _refresh_memory(self) -> None:
        """Store NVML's current free memory, so scrapes and other processes see fresh figures."""
        if self._nvml is None:
            return
        readings = [(d, self._memory(d)) for d in self.devices]
        with self._txn() as conn:
            conn.executemany(
                "UPDATE devices SET free_mb = ?, processes = ?, updated_at = ? WHERE idx = ? AND uuid = ?",
                [
                    (m.free_mb, m.processes, time.time(), d.index, d.uuid)
                    for d, m in readings
                    if m is not None
                ],
            )

    def _maybe_write_metrics(self) -> None:
        # Throttled: a Prometheus scrape every 15 s does not need a rewrite on every grant.
        if self.metrics_textfile and time.monotonic() - self._last_metrics >= self.metrics_interval_s:
            try:
                self.write_metrics()
            except OSError as exc:
                log.warning("could not write GPU metrics to %s: %s", self.metrics_path, exc)

    def close(self) -> None:
        """Write the metrics file one last time and close the database."""
        if self.metrics_textfile:
            with contextlib.suppress(OSError, sqlite3.Error):
                self.write_metrics()
        with self._tlock:
            if self._keeper is not None and self._keeper_pid == os.getpid():
                self._keeper.close()
            self._keeper = None
            for (pid, _), waker in self._wakers.items():
                if waker is not None and pid == os.getpid():
                    waker.close()
            self._wakers.clear()
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
            self._conn, self._lock_fd, self._pid = None, None, -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_torch_cuda_cache() -> None:
    # torch keeps freed blocks cached; without this the next holder's NVML free-memory check sees
    # our memory as still used until this process exits.
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except RuntimeError as exc:  # best effort only
        log.debug("torch.cuda.empty_cache failed: %s", exc)


def _policy_json(policy: TaskPolicy) -> dict[str, Any]:
    data = dataclasses.asdict(policy)
    data["busy_policy"] = policy.busy_policy.value
    return data


# ---------------------------------------------------------------------------------------------
# Snapshot and metrics (also used by processes that do not lease, such as `mloc gpu status`)


def _snapshot(
    conn: sqlite3.Connection, db_path: Path, nvml: NvmlBackend | None, metrics_path: Path
) -> dict[str, Any]:
    now = time.time()
    meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
    leases = {r["device_idx"]: dict(r) for r in conn.execute("SELECT * FROM leases")}
    devices = []
    for r in conn.execute("SELECT * FROM devices ORDER BY idx"):
        d = dict(r)
        if d["kind"] == "cuda" and nvml is not None:
            try:
                mem = nvml.memory(d["idx"])
                d.update(total_mb=mem.total_mb, free_mb=mem.free_mb, processes=mem.processes, updated_at=now)
            except NVML_ERRORS as exc:  # show the last stored figures instead
                log.debug("NVML memory query for device %d failed: %s", d["idx"], exc)
        lease = leases.get(d["idx"])
        devices.append(
            {
                "index": d["idx"],
                "uuid": d["uuid"],
                "name": d["name"],
                "kind": d["kind"],
                "total_mb": d["total_mb"],
                "free_mb": d["free_mb"],
                "processes": d["processes"],
                "memory_updated_at": d["updated_at"],
                "holder": lease["holder"] if lease else None,
            }
        )
    lease_list = [
        {
            "device_index": r["device_idx"],
            "lease_id": r["lease_id"],
            "holder": r["holder"],
            "task_type": r["task_type"],
            "priority": r["priority"],
            "node": r["node"],
            "pid": r["pid"],
            "held_s": round(now - r["granted_at"], 3),
            "heartbeat_age_s": round(now - r["heartbeat_at"], 3),
            "ttl_s": r["ttl_s"],
            "max_hold_s": r["max_hold_s"],
            "watchdog_exceeded": r["watchdog_at"] is not None,
        }
        for r in sorted(leases.values(), key=lambda r: r["device_idx"])
    ]
    queue = [
        {
            "position": i,
            "lease_id": r["lease_id"],
            "holder": r["holder"],
            "task_type": r["task_type"],
            "priority": r["priority"],
            "min_free_mb": r["min_free_mb"],
            "node": r["node"],
            "pid": r["pid"],
            "waited_s": round(now - r["enqueued_at"], 3),
        }
        for i, r in enumerate(conn.execute("SELECT * FROM queue ORDER BY priority DESC, ticket ASC"))
    ]
    counters: dict[str, dict[str, float]] = {name: {} for name in COUNTER_HELP}
    for r in conn.execute("SELECT name, task_type, value FROM counters"):
        counters.setdefault(r["name"], {})[r["task_type"]] = r["value"]
    totals = {name: sum(by_task.values()) for name, by_task in counters.items()}
    histograms: dict[str, dict[str, Any]] = {}
    for r in conn.execute("SELECT name, task_type, outcome, sum, count FROM hist_sum"):
        key = f"{r['task_type']}/{r['outcome']}" if r["outcome"] else r["task_type"]
        histograms.setdefault(r["name"], {})[key] = {
            "count": r["count"],
            "sum_ms": round(r["sum"], 3),
            "mean_ms": round(r["sum"] / r["count"], 3),
        }
    return {
        "taken_at": now,
        "node": meta.get("node"),
        "mode": meta.get("mode"),
        "db_path": str(db_path),
        "metrics_path": str(metrics_path),
        "devices": devices,
        "leases": lease_list,
        "queue": queue,
        "counters": counters,
        "totals": totals,
        "histograms": histograms,
        "policies": json.loads(meta.get("policies", "{}")),
    }


def read_snapshot(state_dir: str | os.PathLike[str], use_nvml: bool = True) -> dict[str, Any]:
    """Snapshot of an arbiter state directory from any process, without registering devices."""
    state = Path(state_dir)
    db_path = state / DB_NAME
    if not db_path.exists():
        return {
            "taken_at": time.time(),
            "node": default_node_id(),
            "mode": None,
            "db_path": str(db_path),
            "metrics_path": str(state / METRICS_NAME),
            "devices": [],
            "leases": [],
            "queue": [],
            "counters": {name: {} for name in COUNTER_HELP},
            "totals": dict.fromkeys(COUNTER_HELP, 0.0),
            "histograms": {},
            "policies": {},
        }
    nvml = PynvmlBackend.load()[0] if use_nvml else None
    conn = _connect(db_path)
    try:
        return _snapshot(conn, db_path, nvml, state / METRICS_NAME)
    finally:
        conn.close()


def metrics_text(state_dir: str | os.PathLike[str]) -> str:
    """The Prometheus text exposition of an arbiter state directory (for `mloc gpu metrics`)."""
    registry = CollectorRegistry()
    db_path = Path(state_dir) / DB_NAME
    if not db_path.exists():
        return ""
    registry.register(_DbCollector(db_path))
    return generate_latest(registry).decode()


class _DbCollector(Collector):
    """Prometheus collector reading the cumulative metrics from SQLite.

    In-process prometheus_client counters would only see this process's requests, and every step
    is its own process; the totals therefore live in the database and are read at scrape time.
    """

    def __init__(self, source: Arbiter | Path) -> None:
        self._source = source

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        if isinstance(self._source, Arbiter):
            with self._source._read() as conn:
                yield conn
        else:
            conn = _connect(self._source)
            try:
                yield conn
            finally:
                conn.close()

    def collect(self) -> Iterator[Any]:
        prefix = "mloc_gpu_arbiter"
        with self._conn() as conn:
            counter_rows = conn.execute("SELECT name, task_type, value FROM counters").fetchall()
            hist_rows = conn.execute("SELECT name, task_type, outcome, bucket, count FROM hist").fetchall()
            sum_rows = conn.execute("SELECT name, task_type, outcome, sum, count FROM hist_sum").fetchall()
            queue_length = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            queue_by_task = conn.execute(
                "SELECT task_type, COUNT(*) FROM queue GROUP BY task_type"
            ).fetchall()
            devices = conn.execute(
                "SELECT d.idx, d.uuid, d.kind, d.free_mb, l.lease_id FROM devices d "
                "LEFT JOIN leases l ON l.device_idx = d.idx ORDER BY d.idx"
            ).fetchall()

        for name, help_text in COUNTER_HELP.items():
            family = CounterMetricFamily(f"{prefix}_{name}", help_text, labels=["task_type"])
            for r in counter_rows:
                if r["name"] == name:
                    family.add_metric([r["task_type"]], r["value"])
            yield family

        for name, help_text, labels in (
            ("wait_ms", "Time from request to decision, in milliseconds.", ["task_type", "outcome"]),
            ("hold_ms", "Time a device was held, in milliseconds.", ["task_type"]),
        ):
            family = HistogramMetricFamily(f"{prefix}_{name}", help_text, labels=labels)
            for s in (r for r in sum_rows if r["name"] == name):
                counts = [0] * len(BUCKETS_MS)
                for h in hist_rows:
                    if (h["name"], h["task_type"], h["outcome"]) == (name, s["task_type"], s["outcome"]):
                        counts[h["bucket"]] = h["count"]
                cumulative, buckets = 0, []
                for le, n in zip(BUCKETS_MS, counts, strict=True):
                    cumulative += n
                    buckets.append((floatToGoString(le), cumulative))
                values = [s["task_type"], s["outcome"]] if len(labels) == 2 else [s["task_type"]]
                family.add_metric(values, buckets, sum_value=s["sum"])
            yield family

        gauge = GaugeMetricFamily(
            f"{prefix}_queue_length", "Requests waiting for a device.", labels=["task_type"]
        )
        gauge.add_metric(["all"], queue_length)
        for task_type, n in queue_by_task:
            gauge.add_metric([task_type], n)
        yield gauge
        held = GaugeMetricFamily(
            f"{prefix}_device_leased", "1 if the device is leased.", labels=["device", "uuid"]
        )
        free = GaugeMetricFamily(
            f"{prefix}_device_free_mb", "Free memory last seen by NVML, in MiB.", labels=["device", "uuid"]
        )
        for d in devices:
            held.add_metric([str(d["idx"]), d["uuid"]], 1 if d["lease_id"] else 0)
            if d["free_mb"] is not None:
                free.add_metric([str(d["idx"]), d["uuid"]], d["free_mb"])
        yield held
        yield free
