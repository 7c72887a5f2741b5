"""What the node's arbiter is doing, read from the lease store by any process (``mloc gpu status``)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from mloc_dagster.core.arbiter.devices import NVML_ERRORS, NvmlBackend, PynvmlBackend
from mloc_dagster.core.arbiter.metrics import TEXTFILE_NAME
from mloc_dagster.core.arbiter.store import COUNTER_HELP, DB_NAME, connect, default_node_id

log = logging.getLogger("mloc_dagster.arbiter")


def snapshot(conn: sqlite3.Connection, db_path: Path, nvml: NvmlBackend | None, metrics_path: Path) -> dict[str, Any]:
    """Devices (with live memory), leases, queue in granting order, counters and histograms."""
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
            "metrics_path": str(state / TEXTFILE_NAME),
            "devices": [],
            "leases": [],
            "queue": [],
            "counters": {name: {} for name in COUNTER_HELP},
            "totals": dict.fromkeys(COUNTER_HELP, 0.0),
            "histograms": {},
            "policies": {},
        }
    nvml = PynvmlBackend.load()[0] if use_nvml else None
    conn = connect(db_path)
    try:
        return snapshot(conn, db_path, nvml, state / TEXTFILE_NAME)
    finally:
        conn.close()

