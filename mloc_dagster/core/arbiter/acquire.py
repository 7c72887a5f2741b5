"""``Arbiter``: ask for a device, wait for it, give it back. The request side of the arbiter.

A request queues in the lease store and, unless a device is free at once, sleeps on its wake-up
pipe; the grant itself is written by whoever frees a device (``granting``). Every 0.5 s a waiter
also takes the write lock to heartbeat its queue entry, reclaim devices from dead holders, notice
NVML memory changes, and give up at its deadline by its task type's busy policy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from mloc_dagster.core.arbiter import metrics
from mloc_dagster.core.arbiter.devices import NvmlBackend, discover_devices, free_torch_cuda_cache
from mloc_dagster.core.arbiter.granting import Granter
from mloc_dagster.core.arbiter.lease import Keeper, Lease, busy_lease, granted_lease
from mloc_dagster.core.arbiter.policy import (
    OTHER_POLICY,
    BusyPolicy,
    Outcome,
    Reason,
    TaskPolicy,
    TaskType,
    normalize_task_type,
    resolve_policies,
)
from mloc_dagster.core.arbiter.snapshot import snapshot
from mloc_dagster.core.arbiter.store import LeaseStore, default_node_id
from mloc_dagster.core.arbiter.wakeup import Grant, Waker, clean_stale_wakers, wake

log = logging.getLogger("mloc_dagster.arbiter")

WAKE_DIR = "wake"


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
        self.metrics_path = self.state_dir / metrics.TEXTFILE_NAME
        self.wake_dir = self.state_dir / WAKE_DIR
        self.wake_dir.mkdir(exist_ok=True)
        self.policies = resolve_policies(policies)
        self.heartbeat_ttl_s = float(heartbeat_ttl_s)
        self.node_id = node_id or default_node_id()
        self.metrics_textfile = metrics_textfile
        self.metrics_interval_s = metrics_interval_s
        self._explicit_poll_s = poll_interval_s
        self.mode, self.devices, self._nvml = discover_devices(simulated_devices, cpu_slots, nvml, use_nvml)

        self.store = LeaseStore(self.state_dir)
        self.db_path = self.store.db_path
        self.granter = Granter(self.store, self.node_id, self._nvml, liveness_interval_s)
        self._last_metrics = -math.inf
        self._wakers: dict[tuple[int, int], Waker | None] = {}
        self._keeper: Keeper | None = None
        self._keeper_pid = -1
        self.store.register_inventory(self.devices, self._nvml, self.mode, self.node_id, self.policies)
        clean_stale_wakers(self.wake_dir)

    def policy_for(self, task_type: TaskType | str) -> TaskPolicy:
        return self.policies.get(normalize_task_type(task_type), OTHER_POLICY)

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
        wake_path = str(waker.path) if waker is not None else None
        granter = self.granter

        def decide(conn: sqlite3.Connection, reason: Reason) -> Lease:
            return self._decide_busy(conn, task, holder, policy, lease_id, started, reason)

        def collect(conn: sqlite3.Connection) -> Lease | None:
            return granted_lease(conn, self, task, holder, policy, lease_id, started)

        self._wake_all(granter.liveness_pass())
        try:
            with self.store.txn() as conn:
                now = time.time()
                others = granter.maintain(conn, now, grant=False)
                waiting = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                if waiting >= policy.queue_limit:
                    # Devices may have just been freed by the maintenance: serve the queue first.
                    others += granter.grant_pass(conn, now)
                    waiting = conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                if waiting >= policy.queue_limit:
                    lease = decide(conn, Reason.QUEUE_FULL)
                else:
                    self._enqueue(conn, lease_id, holder, task, policy, now, wake_path)
                    others += granter.grant_pass(conn, now)
                    lease = collect(conn)
                    if lease is None and policy.max_wait_s <= 0:
                        conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                        blocked = lease_id in granter.mem_blocked
                        lease = decide(conn, Reason.INSUFFICIENT_MEMORY if blocked else Reason.BUSY)
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
                with self.store.read() as conn:
                    lease = collect(conn)
                now_m = time.monotonic()
                if lease is not None or (now_m < next_maintain and now_m < deadline):
                    continue
                next_maintain = now_m + maintain_every_s
                self._wake_all(granter.liveness_pass())
                with self.store.txn() as conn:
                    now = time.time()
                    others = granter.maintain(conn, now)
                    lease = collect(conn)
                    if lease is None:
                        queued = conn.execute(
                            "UPDATE queue SET heartbeat_at = ? WHERE lease_id = ?", (now, lease_id)
                        ).rowcount
                        if time.monotonic() >= deadline:
                            conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                            blocked = lease_id in granter.mem_blocked
                            lease = decide(conn, Reason.INSUFFICIENT_MEMORY if blocked else Reason.TIMEOUT)
                        elif not queued:
                            # Our queue entry outlived its TTL (this process was starved of CPU):
                            # queue again rather than wait for a grant that cannot come.
                            log.warning("GPU request %s lost its queue entry; queueing again", holder)
                            self._enqueue(conn, lease_id, holder, task, policy, now, wake_path)
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
        wake_path: str | None,
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
                self.store.own_start,
                now,
                now,
                wake_path,
            ),
        )

    def _abandon(self, lease_id: str) -> None:
        try:
            with self.store.txn() as conn:
                conn.execute("DELETE FROM queue WHERE lease_id = ?", (lease_id,))
                conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))
                others = self.granter.grant_pass(conn, time.time())
            self._wake_all(others)
        except sqlite3.Error as exc:  # the TTL and the pid check clean up after us anyway
            log.warning("could not withdraw GPU request %s: %s", lease_id[:8], exc)

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
        self.store.count(conn, "queue_full" if reason is Reason.QUEUE_FULL else "timeouts", task)
        if policy.busy_policy is BusyPolicy.SKIP:
            outcome = Outcome.SKIPPED
            self.store.count(conn, "skipped", task)
        elif policy.busy_policy is BusyPolicy.FALLBACK_CPU:
            outcome = Outcome.FALLBACK_CPU
            self.store.count(conn, "fallback_cpu", task)
        else:
            outcome = Outcome.QUEUE_FULL if reason is Reason.QUEUE_FULL else Outcome.TIMEOUT
        lease = busy_lease(self, outcome, reason, task, holder, policy, lease_id, started)
        self.store.observe(conn, "wait_ms", task, outcome, lease.wait_ms)
        log.info("GPU request %s (%s): %s after %.0f ms (%s)", holder, task, outcome.value, lease.wait_ms, reason.value)
        return lease

    def release_lease(self, lease: Lease) -> None:
        if self._keeper is not None:
            self._keeper.remove(lease)
        if lease.device_kind == "cuda":
            free_torch_cuda_cache()
        with self.store.txn() as conn:
            gone = conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease.lease_id,)).rowcount == 0
            if gone:
                lease.lost = True
            else:
                self.store.count(conn, "released", lease.task_type)
                self.store.observe(conn, "hold_ms", lease.task_type, "", lease.hold_ms or 0.0)
            others = self.granter.maintain(conn, time.time())
        self._wake_all(others)
        if gone:
            log.error(
                "GPU lease %s of %s had been reclaimed before release (hold %.0f ms)",
                lease.lease_id[:8],
                lease.holder,
                lease.hold_ms or 0.0,
            )
        self._maybe_write_metrics()

    def heartbeat_leases(self, lease_ids: list[str]) -> tuple[set[str], set[str]]:
        """Refresh heartbeats; returns the ids still held and the ids whose watchdog has fired."""
        self._wake_all(self.granter.liveness_pass())
        with self.store.txn() as conn:
            now = time.time()
            others = self.granter.maintain(conn, now)
            conn.executemany("UPDATE leases SET heartbeat_at = ? WHERE lease_id = ?", [(now, i) for i in lease_ids])
            marks = ",".join("?" * len(lease_ids))
            rows = conn.execute(
                f"SELECT lease_id, watchdog_at FROM leases WHERE lease_id IN ({marks})", lease_ids
            ).fetchall()
        self._wake_all(others)
        return {r["lease_id"] for r in rows}, {r["lease_id"] for r in rows if r["watchdog_at"] is not None}

    # -- wake-ups and the keeper thread -----------------------------------------------------------

    def _wake_all(self, grants: list[Grant], except_id: str | None = None) -> None:
        for lease_id, wake_path in grants:
            if lease_id != except_id:
                wake(wake_path)

    def _waker(self) -> Waker | None:
        key = (os.getpid(), threading.get_ident())
        if key not in self._wakers:
            self._wakers[key] = Waker.create(self.wake_dir / f"{key[0]}-{key[1]}-{id(self):x}.fifo")
        return self._wakers[key]

    def _keeper_thread(self) -> Keeper:
        with self.store.lock:
            if self._keeper is None or self._keeper_pid != os.getpid():  # threads do not survive fork
                self._keeper = Keeper(self)
                self._keeper_pid = os.getpid()
                self._keeper.start()
            return self._keeper

    # -- observability --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Devices (with live memory), leases, queue in granting order, counters and histograms."""
        with self.store.read() as conn:
            return snapshot(conn, self.db_path, self._nvml, self.metrics_path)

    def write_metrics(self) -> Path:
        """Write the Prometheus text file (node-exporter textfile collector format)."""
        self.store.refresh_memory(self.devices, self._nvml)
        metrics.write_textfile(self.state_dir, self.metrics_path)
        self._last_metrics = time.monotonic()
        return self.metrics_path

    def _maybe_write_metrics(self) -> None:
        # Throttled: a Prometheus scrape every 15 s does not need a rewrite on every grant.
        if self.metrics_textfile and time.monotonic() - self._last_metrics >= self.metrics_interval_s:
            try:
                self.write_metrics()
            except (OSError, sqlite3.Error, ValueError, struct.error) as exc:  # never fail a grant
                log.warning("could not write GPU metrics to %s: %s", self.metrics_path, exc)

    def close(self) -> None:
        """Write the metrics file one last time and close the database."""
        if self.metrics_textfile:
            with contextlib.suppress(OSError, sqlite3.Error):
                self.write_metrics()
        with self.store.lock:
            if self._keeper is not None and self._keeper_pid == os.getpid():
                self._keeper.close()
            self._keeper = None
            for (pid, _), waker in self._wakers.items():
                if waker is not None and pid == os.getpid():
                    waker.close()
            self._wakers.clear()
            self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
