"""Granting: who gets a free device, and cleaning up after holders and waiters that died.

Granting is a hand-off: whoever frees a device (a release, a reclaim) grants it to the best waiter
inside the same transaction and then pokes that waiter (``wakeup``), so no waiter can jump the
queue. Order: ``priority DESC, ticket ASC``; a waiter that needs more free memory than any free
device has is passed over for a smaller request behind it (backfill), and remembered in
``mem_blocked`` so its answer can say ``insufficient_memory``.

Every function here runs inside a transaction the caller opened and returns the grants made, whose
waiters the caller wakes after commit.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from mloc_dagster.core.arbiter.devices import Device, NvmlBackend, read_memory
from mloc_dagster.core.arbiter.policy import Outcome
from mloc_dagster.core.arbiter.store import LeaseStore, pid_alive, pid_exists
from mloc_dagster.core.arbiter.wakeup import Grant

log = logging.getLogger("mloc_dagster.arbiter")


class Granter:
    """The queue's rules over one lease store, for the processes of one node."""

    def __init__(self, store: LeaseStore, node_id: str, nvml: NvmlBackend | None, liveness_interval_s: float) -> None:
        self.store = store
        self.node_id = node_id
        self.nvml = nvml
        self.liveness_interval_s = liveness_interval_s
        self.mem_blocked: set[str] = set()
        self._last_liveness = 0.0

    def maintain(self, conn: sqlite3.Connection, now: float, grant: bool = True) -> list[Grant]:
        """Reclaim stale leases, drop silent waiters, fire watchdogs, hand free devices out."""
        for row in conn.execute("SELECT * FROM leases WHERE heartbeat_at + ttl_s < ?", (now,)).fetchall():
            self.reclaim(conn, row, f"heartbeat older than {row['ttl_s']:.1f} s")
        for row in conn.execute("SELECT * FROM queue WHERE heartbeat_at + ttl_s < ?", (now,)).fetchall():
            # Its process is silent (frozen, or on another node): if it wakes up, it queues again.
            conn.execute("DELETE FROM queue WHERE ticket = ?", (row["ticket"],))
            self.store.count(conn, "dropped_waiters", row["task_type"])
            log.warning("GPU arbiter dropped waiter %s: no heartbeat for %.1f s", row["holder"], row["ttl_s"])

        for row in conn.execute(
            "SELECT lease_id, holder, task_type, device_idx, granted_at, max_hold_s FROM leases "
            "WHERE watchdog_at IS NULL AND max_hold_s IS NOT NULL AND granted_at + max_hold_s <= ?",
            (now,),
        ).fetchall():
            conn.execute("UPDATE leases SET watchdog_at = ? WHERE lease_id = ?", (now, row["lease_id"]))
            self.store.count(conn, "watchdog_exceeded", row["task_type"])
            log.warning(
                "GPU watchdog: %s (%s) has held device %d for %.0f s, over max_hold_s=%.0f s",
                row["holder"],
                row["task_type"],
                row["device_idx"],
                now - row["granted_at"],
                row["max_hold_s"],
            )

        return self.grant_pass(conn, now) if grant else []

    def liveness_pass(self) -> list[Grant]:
        """Reclaim leases and queue entries of processes on this node that died.

        The pid checks (a /proc read or two each) run outside the write lock, and at most one
        process per node runs them per liveness interval, so they never sit on a grant's path.
        """
        mono = time.monotonic()
        if mono - self._last_liveness < self.liveness_interval_s:
            return []
        self._last_liveness = mono
        now = time.time()
        with self.store.read() as conn:
            last = conn.execute("SELECT value FROM meta WHERE key = 'liveness_at'").fetchone()
            if last is not None and now - float(last[0]) < self.liveness_interval_s:
                return []
            leases = conn.execute("SELECT lease_id, pid, pid_start FROM leases WHERE node = ?", (self.node_id,))
            dead_leases = [r["lease_id"] for r in leases.fetchall() if not pid_alive(r["pid"], r["pid_start"])]
            waiters = conn.execute("SELECT lease_id, pid, pid_start FROM queue WHERE node = ?", (self.node_id,))
            dead_waiters = [r["lease_id"] for r in waiters.fetchall() if not pid_alive(r["pid"], r["pid_start"])]
        grants: list[Grant] = []
        with self.store.txn() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('liveness_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(now),),
            )
            for lease_id in dead_leases:
                row = conn.execute("SELECT * FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
                if row is not None:
                    self.reclaim(conn, row, f"holder pid {row['pid']} is dead")
            for lease_id in dead_waiters:
                row = conn.execute("SELECT * FROM queue WHERE lease_id = ?", (lease_id,)).fetchone()
                if row is not None:
                    self.drop_waiter(conn, row)
            if dead_leases or dead_waiters:
                grants = self.grant_pass(conn, time.time())
        return grants

    def drop_waiter(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        conn.execute("DELETE FROM queue WHERE ticket = ?", (row["ticket"],))
        self.store.count(conn, "dropped_waiters", row["task_type"])
        if row["wake"]:
            with contextlib.suppress(OSError):
                Path(row["wake"]).unlink()
        log.warning("GPU arbiter dropped waiter %s: pid %d is dead", row["holder"], row["pid"])

    def reclaim(self, conn: sqlite3.Connection, row: sqlite3.Row, why: str) -> None:
        conn.execute("DELETE FROM leases WHERE lease_id = ?", (row["lease_id"],))
        self.store.count(conn, "reclaimed", row["task_type"])
        log.warning(
            "GPU arbiter reclaimed device %d from %s (%s, pid %d on %s): %s",
            row["device_idx"],
            row["holder"],
            row["task_type"],
            row["pid"],
            row["node"],
            why,
        )

    def grant_pass(self, conn: sqlite3.Connection, now: float) -> list[Grant]:
        """Hand every free device to the best waiter that fits it."""
        self.mem_blocked.clear()
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
        memory = {d.index: read_memory(self.nvml, d) for d in free}
        granted: list[Grant] = []
        for w in waiters:
            if not free:
                break
            # A cheap existence check per grant: a device handed to a dead waiter would sit idle
            # until the next liveness pass (which also catches zombies and recycled pids).
            if w["node"] == self.node_id and not pid_exists(w["pid"]):
                self.drop_waiter(conn, w)
                continue
            fits = [d for d in free if memory[d.index] is None or memory[d.index].free_mb >= w["min_free_mb"]]
            if not fits:
                # Backfill: a device the head of the queue cannot use (too little free memory) may
                # still serve a smaller request further down.
                self.mem_blocked.add(w["lease_id"])
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
            self.store.count(conn, "acquired", w["task_type"])
            self.store.observe(conn, "wait_ms", w["task_type"], Outcome.ACQUIRED, (now - w["enqueued_at"]) * 1000.0)
            free.remove(best)
            granted.append((w["lease_id"], w["wake"]))
        return granted
