"""`mloc gpu ...`: what the node's GPU arbiter is doing right now. Reads the lease database only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mloc_dagster.core.arbiter.metrics import metrics_text
from mloc_dagster.core.arbiter.snapshot import read_snapshot
from mloc_dagster.paths import MlocPaths

gpu_app = typer.Typer(
    no_args_is_help=True, help="The node-local GPU arbiter: devices, leases, queue, counters."
)

STATE_DIR_OPTION = typer.Option(None, "--state-dir", help="Arbiter state directory (default $MLOC_HOME/gpu).")


@gpu_app.callback()
def _gpu() -> None:
    """The node-local GPU arbiter."""


@gpu_app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the snapshot as JSON."),
    state_dir: Path = STATE_DIR_OPTION,
) -> None:
    """Devices with free memory, leases, the queue in granting order, and cumulative counters."""
    snap = read_snapshot(state_dir or MlocPaths.from_env().gpu)
    if as_json:
        typer.echo(json.dumps(snap, indent=2, sort_keys=True))
        return
    render(snap, Console())


@gpu_app.command("metrics")
def metrics(state_dir: Path = STATE_DIR_OPTION) -> None:
    """Print the Prometheus text exposition (the same as the arbiter.prom textfile)."""
    typer.echo(metrics_text(state_dir or MlocPaths.from_env().gpu), nl=False)


def render(snap: dict[str, Any], out: Console) -> None:
    if snap["mode"] is None:
        out.print(f"No GPU arbiter state at {snap['db_path']}: nothing has asked for a device yet.")
        return
    mode = {"nvml": "GPUs via NVML", "simulated": "simulated devices", "cpu": "CPU mode (no GPU / no NVML)"}
    out.print(
        f"[bold]GPU arbiter[/] on {snap['node']}: {mode.get(snap['mode'], snap['mode'])}  ({snap['db_path']})"
    )

    devices = Table(title="Devices")
    for column in ("#", "uuid", "name", "free / total MiB", "processes"):
        devices.add_column(column)
    devices.add_column("holder", overflow="fold")
    for d in snap["devices"]:
        memory = "-" if d["total_mb"] is None else f"{_mb(d['free_mb'])} / {_mb(d['total_mb'])}"
        devices.add_row(
            str(d["index"]),
            escape(d["uuid"]),
            escape(d["name"]),
            memory,
            _opt(d["processes"]),
            escape(d["holder"]) if d["holder"] else "[green]free[/]",
        )
    out.print(devices)

    leases = Table(title="Leases")
    for column in ("device", "holder", "task", "prio", "pid", "held", "heartbeat", "watchdog"):
        leases.add_column(column, overflow="fold")
    for lease in snap["leases"]:
        leases.add_row(
            str(lease["device_index"]),
            escape(lease["holder"]),
            lease["task_type"],
            str(lease["priority"]),
            str(lease["pid"]),
            _duration(lease["held_s"]),
            _duration(lease["heartbeat_age_s"]),
            "[red]exceeded[/]" if lease["watchdog_exceeded"] else "ok",
        )
    out.print(leases)

    queue = Table(title="Queue (granting order)")
    for column in ("#", "holder", "task", "prio", "min free MiB", "pid", "waited"):
        queue.add_column(column, overflow="fold")
    for w in snap["queue"]:
        queue.add_row(
            str(w["position"]),
            escape(w["holder"]),
            w["task_type"],
            str(w["priority"]),
            str(w["min_free_mb"]),
            str(w["pid"]),
            _duration(w["waited_s"]),
        )
    out.print(queue)

    counters = Table(title="Counters (node totals)")
    counters.add_column("counter")
    counters.add_column("total", justify="right")
    counters.add_column("by task type")
    for name, by_task in snap["counters"].items():
        detail = ", ".join(f"{task}={value:g}" for task, value in sorted(by_task.items()))
        counters.add_row(name, f"{snap['totals'][name]:g}", detail)
    for name, by_key in snap["histograms"].items():
        for key, h in sorted(by_key.items()):
            counters.add_row(f"{name} {key}", str(h["count"]), f"mean {h['mean_ms']:.1f} ms")
    out.print(counters)
    out.print(f"metrics textfile: {snap['metrics_path']}  (taken {time.strftime('%H:%M:%S')})")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
