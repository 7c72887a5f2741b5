"""A lease as the caller sees it, and the keeper thread that heartbeats held leases and fires watchdogs."""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, Self

from mloc_dagster.core.arbiter.devices import Device
from mloc_dagster.core.arbiter.policy import Outcome, Reason, TaskPolicy

log = logging.getLogger("mloc_dagster.arbiter")


class LeaseOwner(Protocol):
    """What a lease and its keeper need from the arbiter that granted it (``Arbiter`` is one)."""

    heartbeat_ttl_s: float

    def release_lease(self, lease: Lease) -> None:
        """Give the lease's device back and wake whoever waits for it."""

    def heartbeat_leases(self, lease_ids: list[str]) -> tuple[set[str], set[str]]:
        """Refresh the leases' heartbeats; returns the ids still held and those whose watchdog fired."""


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
    _owner: LeaseOwner | None = field(default=None, repr=False)
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
        if self.acquired and self._owner is not None:
            self._owner.release_lease(self)

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


def granted_lease(
    conn: sqlite3.Connection,
    arbiter: LeaseOwner,
    task: str,
    holder: str,
    policy: TaskPolicy,
    lease_id: str,
    started: float,
) -> Lease | None:
    """The lease granted to ``lease_id``, or None while it still waits.

    Read-only on purpose: the granting transaction already counted the grant and started the
    heartbeat clock, so noticing a grant takes no write lock.
    """
    row = conn.execute(
        "SELECT l.*, d.uuid, d.kind, d.name, d.total_mb FROM leases l "
        "LEFT JOIN devices d ON d.idx = l.device_idx WHERE l.lease_id = ?",
        (lease_id,),
    ).fetchone()
    if row is None:
        return None
    now_mono = time.monotonic()
    device = Device(
        index=row["device_idx"],
        uuid=row["uuid"] or f"DEV-{row['device_idx']}",
        name=row["name"] or "",
        kind=row["kind"] or "simulated",
    )
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
        wait_ms=(now_mono - started) * 1000.0,
        granted_at=row["granted_at"],
        enqueued_at=row["enqueued_at"],
        ticket=row["ticket"],
        _owner=arbiter,
        _started=now_mono,
    )


def busy_lease(
    arbiter: LeaseOwner,
    outcome: Outcome,
    reason: Reason,
    task: str,
    holder: str,
    policy: TaskPolicy,
    lease_id: str,
    started: float,
) -> Lease:
    """The answer when no device could be had: run on the CPU (FALLBACK_CPU) or not at all."""
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
        wait_ms=(time.monotonic() - started) * 1000.0,
        _owner=arbiter,
    )


@dataclass
class _Held:
    lease: Lease
    on_watchdog: Callable[[Lease], None] | None
    watchdog_at: float  # monotonic; inf when there is none or it has fired


class Keeper(threading.Thread):
    """One thread per arbiter and process: heartbeats every held lease and fires watchdogs on time.

    One shared thread rather than one per lease keeps thread start and join off the
    acquire/release path.
    """

    def __init__(self, owner: LeaseOwner) -> None:
        super().__init__(name="gpu-arbiter-keeper", daemon=True)
        self._owner = owner
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
        interval = self._owner.heartbeat_ttl_s / 3.0
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
                alive, fired = self._owner.heartbeat_leases([h.lease.lease_id for h in held])
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
                self._owner.heartbeat_ttl_s,
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

