"""`mloc node ...`: the node registry of the shared pool.

list / show        what the registry knows: device, samples/s per base model, last seen, jobs
                   today against the quota, drained, reputation, and whether it may take work now
heartbeat          this machine is alive (registers it with its host and device on first contact)
calibrate          measure this machine with a short real training run; records samples/s
set-quota          a node's own daily job quota (--default: back to MLOC_NODE_DAILY_QUOTA, 10)
drain / undrain    stop / resume giving the node new work
set-reputation     operator override of the trust figure (merges and gates move it otherwise)
place              how a round of N samples would be placed on the pool now (dry run: no quota taken)
"""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

node_app = typer.Typer(no_args_is_help=True, help="The node registry: list, show, heartbeat, calibrate, "
                       "set-quota, drain, undrain, set-reputation, place.")
console = Console()


def _store():
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    return StateStore(resolve_state_url())


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def _ray_table():
    """Ray's node table when the pool is a Ray cluster (MLOC_RAY_DASHBOARD), else None."""
    from mloc_dagster.core.pool.ray_cluster import RayUnreachable, pool_ray_table

    try:
        return pool_ray_table()
    except RayUnreachable as exc:
        _fail(str(exc))


def _ago(t: datetime | None, now: datetime) -> str:
    return "never" if t is None else f"{(now - t).total_seconds():.0f} s ago"


def _speeds(record, width: int = 8) -> str:
    return ", ".join(f"{bm[:width]} {f['samples_per_s']:.1f}" for bm, f in sorted(record.throughput.items())) or "-"


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


@node_app.command("list")
def list_nodes(as_json: bool = typer.Option(False, "--json")) -> None:
    """Nodes the registry knows and whether each may take work now (a node never seen has full
    reputation and no figures)."""
    from mloc_dagster.core.pool.placement import unavailable_reason
    from mloc_dagster.core.pool.reputation import TRUST_BAR
    from mloc_dagster.core.state.nodes import default_daily_quota, node_ttl_s

    now, ttl, quota = datetime.now(UTC), node_ttl_s(), default_daily_quota()
    nodes, ray = _store().list_nodes(), _ray_table()
    if as_json:
        _print_json([n.to_json(now, ttl, quota, ray) for n in nodes])
        return
    liveness = "alive: in the Ray cluster" if ray is not None else f"TTL {ttl:.0f} s"
    table = Table(caption=f"{liveness}, default quota {quota} jobs/day (UTC)")
    for col in ("node", "device", "samples/s by base", "last seen", "jobs today", "reputation", "status"):
        table.add_column(col)
    for n in nodes:
        limit = quota if n.daily_quota is None else n.daily_quota
        reason = unavailable_reason(n, now=now, ttl_s=ttl, default_quota=quota, ray=ray)
        trust = f"{n.reputation:.2f}" + (" (experimental only)" if n.reputation < TRUST_BAR else "")
        status = "[green]available[/]" if reason is None else reason
        table.add_row(n.node_id, n.device.describe() if n.device else "?", _speeds(n), _ago(n.last_seen_at, now),
                      f"{n.jobs_taken(now.date().isoformat())}/{limit}", trust, status)
    console.print(table)


@node_app.command("show")
def show(node_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Everything the registry holds on one node."""
    from mloc_dagster.core.state.nodes import default_daily_quota, node_ttl_s

    record = _store().find_node(node_id)
    if record is None:
        _fail(f"node {node_id!r} is not in the registry (`mloc node list`)")
    data = record.to_json(datetime.now(UTC), node_ttl_s(), default_daily_quota())
    if as_json:
        _print_json(data)
        return
    table = Table(show_header=False, title=node_id)
    for key, value in data.items():
        if key == "throughput":
            value = "\n".join(f"{bm}: {f['samples_per_s']:.2f} samples/s ({f['source']}, {f['at']})"
                              for bm, f in sorted(record.throughput.items())) or "-"
        elif key == "device":
            value = record.device.describe() + (f" ({record.device.uuid})" if record.device.uuid else "") \
                if record.device else "?"
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


@node_app.command("heartbeat")
def heartbeat(node_id: str = typer.Argument(None, help="Default: MLOC_NODE_ID, else this host's name."),
              every: float = typer.Option(0.0, "--every", help="Keep beating every S seconds (0: once)."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """This machine is alive: registers it (host, GPU or CPU) on first contact, then refreshes its
    last-seen time. Nodes unseen for MLOC_NODE_TTL_S (120 s) get no new work."""
    from mloc_dagster.core.pool.calibration import local_device, local_node_id
    from mloc_dagster.core.state.nodes import InvalidNodeId

    node_id = node_id or local_node_id()
    store, device = _store(), local_device()
    while True:
        try:
            record = store.heartbeat_node(node_id, host=socket.gethostname(), device=device)
        except InvalidNodeId as exc:
            _fail(str(exc))
        if as_json:
            _print_json(record.to_json())
        else:
            console.print(f"{node_id}: seen at {record.last_seen_at:%H:%M:%S} UTC ({device.describe()})")
        if every <= 0:
            return
        time.sleep(every)


@node_app.command("calibrate")
def calibrate(node_id: str = typer.Argument(None, help="Default: MLOC_NODE_ID, else this host's name."),
              base_model: Path = typer.Option(None, "--base-model", help="Base model directory "
                                              "(default: the latest base_model materialization)."),
              dataset: Path = typer.Option(None, "--dataset", help="Dataset version directory "
                                           "(default: the latest dataset_version of --dialect)."),
              dialect: str = typer.Option("en-us", "--dialect"),
              steps: int = typer.Option(30, "--steps", min=2, help="Training steps to measure."),
              device: str = typer.Option(None, "--device", help="cuda, cuda:1 or cpu (default: cuda if any)."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Measure this machine with a short real training run (LoRA on the base model, the same loop
    as a training job) and record its samples/s for that base model; also a heartbeat."""
    from mloc_dagster.core.pool.calibration import calibrate as run_calibration
    from mloc_dagster.core.pool.calibration import local_device, local_node_id
    from mloc_dagster.core.state.nodes import InvalidNodeId, validate_node_id
    from mloc_dagster.paths import MlocPaths

    node_id = node_id or local_node_id()
    try:
        validate_node_id(node_id)
    except InvalidNodeId as exc:
        _fail(str(exc))
    if base_model is None or dataset is None:
        base_model, dataset = _latest_inputs(base_model, dataset, dialect)
    for what, path in (("base model", base_model), ("dataset version", dataset)):
        if not Path(path).is_dir():
            _fail(f"{what} {path} is not a directory")
    Console(stderr=True).print(f"calibrating {node_id}: {steps} steps on {Path(base_model).name} / {Path(dataset).name} ...")
    result = run_calibration(base_model, dataset, node_id=node_id, steps=steps, device=device,
                             feature_cache_dir=MlocPaths.from_env().home / "features")
    store = _store()
    store.heartbeat_node(node_id, host=socket.gethostname(), device=local_device(result.device))
    record = store.record_job_throughput(node_id, result.base_model, result.samples_per_s, source="calibrate")
    if as_json:
        _print_json({**result.to_json(), "node": record.to_json()})
        return
    console.print(f"{node_id}: {result.samples_per_s:.1f} samples/s on base model {result.base_model[:12]} "
                  f"({result.samples} samples in {result.train_seconds:.1f} s of training, {result.device})")


def _latest_inputs(base_model: Path | None, dataset: Path | None, dialect: str) -> tuple[Path, Path]:
    from dagster import DagsterInstance

    from mloc_dagster.assets.lineage import latest_metadata

    with DagsterInstance.get() as instance:
        if base_model is None:
            md = latest_metadata(instance, "base_model")
            if md is None:
                _fail("no base_model materialized yet: pass --base-model DIR")
            base_model = Path(md["path"])
        if dataset is None:
            md = latest_metadata(instance, "dataset_version", dialect)
            if md is None:
                _fail(f"dialect {dialect} has no dataset_version yet: pass --dataset DIR or another --dialect")
            dataset = Path(md["path"])
    return base_model, dataset


@node_app.command("set-quota")
def set_quota(node_id: str, quota: int = typer.Argument(None, min=0, help="Training jobs per UTC day."),
              default: bool = typer.Option(False, "--default", help="Back to the deployment default."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """The node's own daily quota of training jobs (taken when a job is placed on it)."""
    from mloc_dagster.core.state.nodes import InvalidNodeId, default_daily_quota

    if (quota is None) == (not default):
        _fail("give a QUOTA or --default")
    try:
        record = _store().set_node_quota(node_id, None if default else quota)
    except InvalidNodeId as exc:
        _fail(str(exc))
    if as_json:
        _print_json(record.to_json())
        return
    shown = f"{default_daily_quota()} (default)" if record.daily_quota is None else str(record.daily_quota)
    console.print(f"{node_id}: daily quota {shown}")


def _drain(node_id: str, drained: bool, reason: str | None, as_json: bool) -> None:
    from mloc_dagster.core.state.nodes import InvalidNodeId

    try:
        record = _store().set_node_drained(node_id, drained, reason)
    except InvalidNodeId as exc:
        _fail(str(exc))
    if as_json:
        _print_json(record.to_json())
    else:
        console.print(f"{node_id}: " + ("drained (no new work; running jobs finish)" if drained else "takes work again"))


@node_app.command("drain")
def drain(node_id: str, reason: str = typer.Option(None, "--reason"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Give the node no new work; jobs already running on it finish."""
    _drain(node_id, True, reason, as_json)


@node_app.command("undrain")
def undrain(node_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The node takes new work again."""
    _drain(node_id, False, None, as_json)


@node_app.command("set-reputation")
def set_reputation(node_id: str, reputation: float = typer.Argument(..., min=0.0, max=1.0)) -> None:
    """Below the trust bar (0.7) a node's adapters only reach experimental candidates."""
    value = _store().set_node_reputation(node_id, reputation)
    console.print(f"{node_id}: reputation {value:.2f}")


@node_app.command("place")
def place(samples: int = typer.Option(..., "--samples", help="Samples in the round."),
          base_model: str = typer.Option(None, "--base-model", help="Base model hash or directory "
                                         "(default: the latest base_model materialization)."),
          method: str = typer.Option("dp", "--method", help="dp (exact), greedy or equal."),
          parallelism: int = typer.Option(None, "--parallelism", help="At most this many slices."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """How a round would be placed on the nodes available now (dry run: no quota is taken)."""
    from mloc_dagster.core.pool.placement import PlacementError, eligible_nodes
    from mloc_dagster.core.pool.placement import place as place_round
    from mloc_dagster.core.state.nodes import default_daily_quota, node_ttl_s

    bm = _base_model_hash(base_model)
    now = datetime.now(UTC)
    ok, skipped = eligible_nodes(_store().list_nodes(), bm, now=now, ttl_s=node_ttl_s(),
                                 default_quota=default_daily_quota(), ray=_ray_table())
    try:
        placement = place_round(ok, samples, method, parallelism=parallelism)
    except PlacementError as exc:
        _fail(f"{exc}" + "".join(f"\n  {n}: {why}" for n, why in skipped.items()))
    if as_json:
        _print_json({**placement.to_json(), "base_model": bm, "skipped": skipped})
        return
    table = Table(title=f"{method}: {samples} samples on base {bm[:12]}, makespan {placement.makespan_s:.1f} s "
                        f"(lower bound {placement.lower_bound_s:.1f} s)")
    for col in ("node", "samples", "range", "samples/s", "expected s"):
        table.add_column(col)
    for s in placement.shards:
        table.add_row(s.node_id, str(s.samples), f"{s.start}-{s.stop - 1}", f"{s.samples_per_s:.1f}", f"{s.expected_s:.1f}")
    console.print(table)
    for node_id, why in skipped.items():
        console.print(f"skipped {node_id}: {why}")
    for warning in placement.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _base_model_hash(base_model: str | None) -> str:
    from mloc_dagster.core.publish import model_dir_hash

    if base_model and Path(base_model).is_dir():
        return model_dir_hash(base_model)
    if base_model:
        return base_model
    from dagster import DagsterInstance

    from mloc_dagster.assets.lineage import latest_metadata

    with DagsterInstance.get() as instance:
        md = latest_metadata(instance, "base_model")
    if md is None:
        _fail("no base_model materialized yet: pass --base-model HASH|DIR")
    return str(md["version"])
