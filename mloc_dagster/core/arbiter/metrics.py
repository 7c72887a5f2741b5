"""The arbiter's Prometheus metrics, named as seed 004 names them.

Every Dagster step is its own process, so the counters and histograms use prometheus_client's
multiprocess mode: each process adds to its own file under ``$PROMETHEUS_MULTIPROC_DIR`` (default
``$MLOC_HOME/metrics``) and whoever exposes them (``mloc metrics serve``, the ``arbiter.prom``
textfile) sums the files of every process, dead or alive, at scrape time.

- ``gpu_arbiter_acquire_total{task_type,status}``  decisions, by outcome (ACQUIRED, SKIPPED,
  FALLBACK_CPU, TIMEOUT, QUEUE_FULL)
- ``gpu_arbiter_queue_wait_ms{task_type,status}``  histogram: request to decision
- ``gpu_arbiter_hold_ms{task_type}``               histogram: grant to release
- ``gpu_arbiter_timeouts_total``, ``gpu_arbiter_queue_full_total``,
  ``gpu_arbiter_watchdog_exceeded_total``, ``gpu_arbiter_reclaimed_total``,
  ``gpu_arbiter_dropped_waiters_total``, ``gpu_arbiter_released_total`` (``{task_type}``)
- ``gpu_arbiter_queue_length{task_type}``, ``gpu_arbiter_device_leased{device,uuid}``,
  ``gpu_arbiter_device_free_mb{device,uuid}``: gauges read from the lease store at scrape time
  (they are state, not events).

The lease store hands every ledger entry to ``record`` once its transaction has committed, so a
rolled-back decision is never counted.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mloc_dagster.paths import mloc_home

log = logging.getLogger("mloc_dagster.arbiter")

TEXTFILE_NAME = "arbiter.prom"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Milliseconds; spans a sub-millisecond hand-off up to a two-hour training hold.
BUCKETS_MS: tuple[float, ...] = (
    1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
    300_000, 900_000, 1_800_000, 3_600_000, 7_200_000,
)  # fmt: skip

# Ledger counters that become a ``gpu_arbiter_<name>_total{task_type}`` counter. The others
# (acquired, skipped, fallback_cpu) are ``gpu_arbiter_acquire_total{status}``.
COUNTERS: dict[str, str] = {
    "timeouts": "Requests that got no device within max_wait_s (any busy policy).",
    "queue_full": "Requests refused at once because queue_limit requests were waiting.",
    "watchdog_exceeded": "Leases held longer than their task type's max_hold_s.",
    "reclaimed": "Leases taken back from a dead holder or after a stale heartbeat.",
    "dropped_waiters": "Queue entries dropped because their process died or went silent.",
    "released": "Leases released by their holder.",
}


class Event(NamedTuple):
    """One ledger entry: a counter (``outcome`` empty, ``value`` the increment) or an observation."""

    name: str
    task_type: str
    outcome: str
    value: float


def multiprocess_dir() -> Path:
    """``$PROMETHEUS_MULTIPROC_DIR``, else ``$MLOC_HOME/metrics``; created if missing."""
    path = Path(os.environ.get(MULTIPROC_ENV) or mloc_home() / "metrics")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class _Metrics:
    acquire: Counter
    queue_wait: Histogram
    hold: Histogram
    counters: dict[str, Counter]


_metrics: tuple[Path, Any, _Metrics] | None = None
_lock = threading.Lock()


@contextlib.contextmanager
def _multiprocess_mode(directory: Path, value_class: Any) -> Iterator[None]:
    """Multiprocess mode while recording, and only then.

    prometheus_client picks a new sample's storage from ``values.ValueClass`` and opens its file
    in the directory the environment names. Both are set here for the duration of the recording
    and restored after, so other prometheus_client users in the process keep their own mode, and
    the default directory (under ``$MLOC_HOME``, which every process of the node shares) does not
    leak into the environment of processes started by this one with another ``MLOC_HOME``.
    """
    previous_class, values.ValueClass = values.ValueClass, value_class
    set_env = not os.environ.get(MULTIPROC_ENV)
    if set_env:
        os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield
    finally:
        values.ValueClass = previous_class
        if set_env:
            os.environ.pop(MULTIPROC_ENV, None)


def _metric_objects(directory: Path) -> tuple[Any, _Metrics]:
    """The metric objects of this process, writing to ``directory`` in multiprocess mode.

    A new directory (another ``MLOC_HOME`` in the same process, as in tests) gets new objects:
    prometheus_client keeps its open files per value class, so a fresh class opens fresh files.
    """
    global _metrics
    if _metrics is None or _metrics[0] != directory:
        built = _Metrics(
            acquire=Counter(
                "gpu_arbiter_acquire", "GPU requests decided, by outcome.", ["task_type", "status"], registry=None
            ),
            queue_wait=Histogram(
                "gpu_arbiter_queue_wait_ms",
                "Time from request to decision, in milliseconds.",
                ["task_type", "status"],
                buckets=BUCKETS_MS,
                registry=None,
            ),
            hold=Histogram(
                "gpu_arbiter_hold_ms",
                "Time a device was held, in milliseconds.",
                ["task_type"],
                buckets=BUCKETS_MS,
                registry=None,
            ),
            counters={
                name: Counter(f"gpu_arbiter_{name}", help_text, ["task_type"], registry=None)
                for name, help_text in COUNTERS.items()
            },
        )
        _metrics = (directory, values.MultiProcessValue(), built)
    return _metrics[1], _metrics[2]


def record(events: Iterable[Event]) -> None:
    """Add committed ledger entries to this process's metrics file. Never raises: a full disk
    must not stop a grant."""
    events = list(events)
    if not events:
        return
    try:
        with _lock:
            directory = multiprocess_dir()
            value_class, m = _metric_objects(directory)
            with _multiprocess_mode(directory, value_class):
                for e in events:
                    if e.name == "wait_ms":
                        m.acquire.labels(e.task_type, e.outcome).inc()
                        m.queue_wait.labels(e.task_type, e.outcome).observe(e.value)
                    elif e.name == "hold_ms":
                        m.hold.labels(e.task_type).observe(e.value)
                    elif e.name in m.counters:
                        m.counters[e.name].labels(e.task_type).inc(e.value)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("could not record GPU arbiter metrics: %s", exc)


class LeaseStoreGauges(Collector):
    """Queue length and device state, read from the lease store at scrape time."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily("gpu_arbiter_queue_length", "Requests waiting for a device.", labels=["task_type"])
        leased = GaugeMetricFamily("gpu_arbiter_device_leased", "1 if the device is leased.", labels=["device", "uuid"])
        free = GaugeMetricFamily(
            "gpu_arbiter_device_free_mb", "Free memory last seen by NVML, in MiB.", labels=["device", "uuid"]
        )
        if self.db_path.exists():
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10.0)
            try:
                waiting = dict(conn.execute("SELECT task_type, COUNT(*) FROM queue GROUP BY task_type").fetchall())
                policies = conn.execute("SELECT value FROM meta WHERE key = 'policies'").fetchone()
                devices = conn.execute(
                    "SELECT d.idx, d.uuid, d.free_mb, l.lease_id FROM devices d "
                    "LEFT JOIN leases l ON l.device_idx = d.idx ORDER BY d.idx"
                ).fetchall()
            finally:
                conn.close()
            # Every known task type gets a sample, 0 included, so an alert on the queue sees it.
            for task_type in sorted(set(json.loads(policies[0]) if policies else {}) | set(waiting)):
                queue.add_metric([task_type], waiting.get(task_type, 0))
            for idx, uuid, free_mb, lease_id in devices:
                leased.add_metric([str(idx), uuid], 1 if lease_id else 0)
                if free_mb is not None:
                    free.add_metric([str(idx), uuid], free_mb)
        yield queue
        yield leased
        yield free


class SettledFilesCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, skipping files another process has just
    created and not yet sized: reading a 0-byte file raises ``struct.error`` mid-scrape."""

    def collect(self) -> Iterable[Any]:
        files = []
        for f in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):
                if os.path.getsize(f) >= 8:  # the 8-byte header (used bytes + padding) is written
                    files.append(f)
        return self.merge(files, accumulate=True)


def registry(state_dir: str | os.PathLike[str]) -> CollectorRegistry:
    """Every process's counters and histograms plus the lease store's gauges."""
    reg = CollectorRegistry()
    SettledFilesCollector(reg, path=str(multiprocess_dir()))
    reg.register(LeaseStoreGauges(Path(state_dir) / "arbiter.sqlite"))
    return reg


def metrics_text(state_dir: str | os.PathLike[str]) -> str:
    """The Prometheus text exposition of the node's arbiter (``mloc gpu metrics``)."""
    return generate_latest(registry(state_dir)).decode()


def write_textfile(state_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Write the exposition atomically for node-exporter's textfile collector."""
    target = Path(path) if path else Path(state_dir) / TEXTFILE_NAME
    write_to_textfile(str(target), registry(state_dir))
    return target
