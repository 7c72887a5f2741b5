"""The node registry: which nodes exist, what they run on, how fast, whether they are alive,
how much of today's quota they used, whether they are drained, and how much their adapters are
trusted (reputation in [0, 1]).

- identity: ``node_id`` (``[a-z0-9-]``, see ``canonical_node_id``), host, device (GPU name, UUID,
  memory; or CPU);
- throughput: samples/s per base model (keyed by the base model's hash), measured by
  `mloc node calibrate` (replaces the figure) and updated after every job the node runs
  (``record_job_throughput``: an EMA, so a straggler's lower figure counts at once, half-weight);
- liveness: ``last_seen_at`` from heartbeats (running jobs, `mloc node heartbeat`); a node unseen
  for longer than the TTL (``MLOC_NODE_TTL_S``, default 120 s) is unavailable;
- daily job quota (``MLOC_NODE_DAILY_QUOTA``, default 10; per-node override), taken at placement
  by one conditional UPDATE (``take_job_quota``); the day is UTC;
- drained: takes no new work (its running jobs finish);
- reputation: moved by merges and gates (``core.pool.reputation``), one atomic EMA step each.

A node unknown to the store is a fresh one: full reputation, no jobs today, never seen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mloc_dagster.core.state.engine import StoreEngine
from mloc_dagster.core.state.schema import DEFAULT_NODE_REPUTATION, nodes

if TYPE_CHECKING:
    from mloc_dagster.core.pool.reputation import ReputationUpdate

DEFAULT_NODE_TTL_S = 120.0
DEFAULT_DAILY_QUOTA = 10
# Weight of a job's measured throughput against the node's previous figure (calibration replaces it).
THROUGHPUT_EMA = 0.5
NODE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,126}[a-z0-9])?$")


class InvalidNodeId(ValueError):
    pass


def node_ttl_s() -> float:
    """Seconds without a heartbeat after which a node is unavailable (``MLOC_NODE_TTL_S``)."""
    return float(os.environ.get("MLOC_NODE_TTL_S", DEFAULT_NODE_TTL_S))


def default_daily_quota() -> int:
    """Training jobs a node may take per UTC day unless it has its own quota (``MLOC_NODE_DAILY_QUOTA``)."""
    return int(os.environ.get("MLOC_NODE_DAILY_QUOTA", DEFAULT_DAILY_QUOTA))


def canonical_node_id(raw: str) -> str:
    """A node id the registry accepts, from a host name or GPU id: lowercase, every run of other
    characters (dots, underscores, ...) becomes one ``-``. ``Worker_3.Lab`` -> ``worker-3-lab``."""
    out = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")[:128].rstrip("-")
    if not out:
        raise InvalidNodeId(f"{raw!r} has nothing to make a node id from")
    return out


def validate_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        hint = ""
        if isinstance(node_id, str):
            try:
                hint = f" (e.g. {canonical_node_id(node_id)!r})"
            except InvalidNodeId:
                pass
        raise InvalidNodeId(f"node id {node_id!r} must be lowercase [a-z0-9-], at most 128 characters{hint}")
    return node_id


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str | None = None  # GPU name
    uuid: str | None = None  # GPU UUID
    memory_mb: int | None = None  # GPU memory

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU"
        mem = f", {self.memory_mb / 1024:.0f} GiB" if self.memory_mb else ""
        return f"{self.name or 'GPU'}{mem}"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    reputation: float
    updated_at: datetime | None
    host: str | None = None
    device: DeviceInfo | None = None
    throughput: dict[str, dict[str, Any]] = field(default_factory=dict)  # base model hash -> figure
    last_seen_at: datetime | None = None
    daily_quota: int | None = None  # None: the deployment default
    jobs_today: int = 0  # jobs taken on ``jobs_day``
    jobs_day: str | None = None
    drained: bool = False
    drained_reason: str | None = None
    registered_at: datetime | None = None

    def samples_per_s(self, base_model: str) -> float | None:
        figure = self.throughput.get(base_model)
        return None if figure is None else float(figure["samples_per_s"])

    def jobs_taken(self, today: str) -> int:
        return self.jobs_today if self.jobs_day == today else 0

    def to_json(self, now: datetime | None = None, ttl_s: float | None = None,
                default_quota: int | None = None, ray: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from mloc_dagster.core.pool.placement import unavailable_reason

        out = asdict(self)
        for key in ("updated_at", "last_seen_at", "registered_at"):
            out[key] = out[key].isoformat() if out[key] else None
        if now is not None:
            quota = default_daily_quota() if default_quota is None else default_quota
            out["quota"] = quota if self.daily_quota is None else self.daily_quota
            out["jobs_today"] = self.jobs_taken(now.date().isoformat())
            out["unavailable"] = unavailable_reason(self, now=now, ttl_s=node_ttl_s() if ttl_s is None else ttl_s,
                                                    default_quota=quota, ray=ray)
        if ray is not None:
            node = ray.get(self.node_id)
            out["ray"] = None if node is None else {"alive": node.alive, "ip": node.ip, "gpus": node.gpus,
                                                    "ray_node_id": node.ray_node_id}
        return out


class NodeStore(StoreEngine):
    # -- reading ---------------------------------------------------------------------------------

    def get_node(self, node_id: str) -> NodeRecord:
        """The node's record; an unknown node is a fresh one (full reputation, never seen)."""
        with self._read() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).mappings().first()
        return NodeRecord(node_id, DEFAULT_NODE_REPUTATION, None) if row is None else _node(row)

    def find_node(self, node_id: str) -> NodeRecord | None:
        """The node's record, or None when the registry has never heard of it."""
        with self._read() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).mappings().first()
        return None if row is None else _node(row)

    def node_reputation(self, node_id: str) -> float:
        return self.get_node(node_id).reputation

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            return [_node(r) for r in conn.execute(sa.select(nodes).order_by(nodes.c.node_id)).mappings()]

    # -- identity, liveness, throughput ------------------------------------------------------------

    def heartbeat_node(self, node_id: str, *, host: str | None = None, device: DeviceInfo | None = None,
                       seen_at: datetime | None = None) -> NodeRecord:
        """The node is alive at ``seen_at`` (default now); registers it on first contact and records
        host and device when given. ``last_seen_at`` never moves backwards (late heartbeats)."""
        validate_node_id(node_id)
        seen = seen_at or self._clock()
        with self._write() as conn:
            row = self._lock_node(conn, node_id)
            values: dict[str, Any] = {"updated_at": self._clock(), **_identity(host, device)}
            if row["last_seen_at"] is None or row["last_seen_at"] < seen:
                values["last_seen_at"] = seen
            conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(**values))
        return self.get_node(node_id)

    def record_job_throughput(self, node_id: str, base_model: str, samples_per_s: float,
                              seen_at: datetime | None = None, *, source: str = "job", host: str | None = None,
                              device: DeviceInfo | None = None) -> NodeRecord:
        """Fold a measured throughput (samples/s on ``base_model``, a base model hash) into the
        node's figure and count it as a heartbeat at ``seen_at`` (with ``host`` and ``device``
        when given: one call after a job registers a node nobody introduced).

        ``source="job"`` (after every training job): EMA, ``new = old + 0.5 · (measured − old)``,
        so a slower job (a straggler) lowers the estimate at once; ``source="calibrate"``
        (`mloc node calibrate`): the measurement replaces the figure.
        """
        validate_node_id(node_id)
        if not base_model:
            raise ValueError("record_job_throughput needs the base model (hash) the figure is for")
        value = float(samples_per_s)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"node {node_id}: throughput must be a positive number of samples/s, got {samples_per_s!r}")
        if source not in ("job", "calibrate"):
            raise ValueError(f"unknown throughput source {source!r}")
        seen = seen_at or self._clock()
        with self._write() as conn:
            row = self._lock_node(conn, node_id)
            figures = dict(row["throughput"] or {})
            old = figures.get(base_model)
            if old is not None and source == "job":
                value = float(old["samples_per_s"]) + THROUGHPUT_EMA * (value - float(old["samples_per_s"]))
            figures[base_model] = {"samples_per_s": round(value, 4), "at": seen.isoformat(), "source": source,
                                   "jobs": int(old.get("jobs", 0) if old else 0) + (source == "job")}
            values: dict[str, Any] = {"throughput": figures, "updated_at": self._clock(),
                                      **_identity(host, device)}
            if row["last_seen_at"] is None or row["last_seen_at"] < seen:
                values["last_seen_at"] = seen
            conn.execute(nodes.update().where(nodes.c.node_id == node_id).values(**values))
        return self.get_node(node_id)

    # -- operator settings ---------------------------------------------------------------------------

    def set_node_quota(self, node_id: str, quota: int | None) -> NodeRecord:
        """The node's own daily job quota; None goes back to the deployment default."""
        validate_node_id(node_id)
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
            raise ValueError(f"a daily quota is a number of jobs >= 0, got {quota!r}")
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(nodes.update().where(nodes.c.node_id == node_id)
                         .values(daily_quota=quota, updated_at=self._clock()))
        return self.get_node(node_id)

    def set_node_drained(self, node_id: str, drained: bool, reason: str | None = None) -> NodeRecord:
        """A drained node takes no new work (placement skips it, its quota cannot be taken)."""
        validate_node_id(node_id)
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(nodes.update().where(nodes.c.node_id == node_id)
                         .values(drained=bool(drained), drained_reason=reason if drained else None,
                                 updated_at=self._clock()))
        return self.get_node(node_id)

    # -- quota ---------------------------------------------------------------------------------------

    def take_job_quota(self, node_id: str, default_quota: int | None = None) -> bool:
        """Count one training job against the node's daily quota; False if it is used up or the
        node is drained.

        One conditional UPDATE, so two jobs racing for the last slot cannot both get it. The day
        rolls over at UTC midnight (the first job of a new day resets the count to 1).
        """
        validate_node_id(node_id)
        today = self._today()
        limit = sa.func.coalesce(nodes.c.daily_quota, default_daily_quota() if default_quota is None else default_quota)
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            result = conn.execute(
                nodes.update()
                .where(nodes.c.node_id == node_id,
                       sa.or_(nodes.c.drained.is_(None), nodes.c.drained == sa.false()),
                       sa.or_(sa.and_(sa.or_(nodes.c.jobs_day.is_(None), nodes.c.jobs_day != today), limit > 0),
                              nodes.c.jobs_today < limit))
                .values(jobs_today=sa.case((nodes.c.jobs_day == today, nodes.c.jobs_today + 1), else_=1),
                        jobs_day=today, updated_at=self._clock()))
        return result.rowcount == 1

    def release_job_quota(self, node_id: str) -> None:
        """Give back a job taken today that will not run (placed, then dropped before launch)."""
        with self._write() as conn:
            release_quota(conn, node_id, self._today(), self._clock())

    # -- reputation ----------------------------------------------------------------------------------

    def set_node_reputation(self, node_id: str, reputation: float) -> float:
        value = min(1.0, max(0.0, float(reputation)))
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(nodes.update().where(nodes.c.node_id == node_id)
                         .values(reputation=value, updated_at=self._clock()))
        return value

    def apply_reputation_updates(self, updates: Mapping[str, ReputationUpdate]) -> dict[str, float]:
        """Apply one EMA step per node (``core.pool.reputation``: ``r + rate · (target − r)``), each a
        single UPDATE on the stored value, all in one transaction, so concurrent merges and gates
        all count. Returns the new reputations."""
        with self._write() as conn:
            return apply_reputation(conn, updates, self._clock(), self._insert)

    # -- internals -----------------------------------------------------------------------------------

    def _ensure_node(self, conn: Connection, node_id: str) -> None:
        _ensure(conn, node_id, self._clock(), self._insert)

    def _lock_node(self, conn: Connection, node_id: str) -> Any:
        """The node's row, created if missing, locked for this write transaction (PostgreSQL:
        FOR UPDATE; SQLite's BEGIN IMMEDIATE already serializes writers)."""
        self._ensure_node(conn, node_id)
        return conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id).with_for_update()).mappings().one()


def _ensure(conn: Connection, node_id: str, now: datetime, insert: Any) -> None:
    conn.execute(insert(nodes).values(node_id=node_id, reputation=DEFAULT_NODE_REPUTATION, jobs_today=0,
                                      jobs_day=None, updated_at=now, registered_at=now)
                 .on_conflict_do_nothing(index_elements=["node_id"]))


def apply_reputation(conn: Connection, updates: Mapping[str, ReputationUpdate], now: datetime,
                     insert: Any) -> dict[str, float]:
    """``NodeStore.apply_reputation_updates`` inside the caller's transaction (a round merge
    records itself and its reputation moves in one, so a retry cannot apply them twice)."""
    new = {}
    for node_id, u in sorted(updates.items()):  # one lock order: no deadlock between two gates
        _ensure(conn, node_id, now, insert)
        moved = nodes.c.reputation + float(u.rate) * (float(u.target) - nodes.c.reputation)
        conn.execute(nodes.update().where(nodes.c.node_id == node_id)
                     .values(reputation=sa.case((moved > 1.0, 1.0), (moved < 0.0, 0.0), else_=moved),
                             updated_at=now))
        new[node_id] = float(conn.execute(sa.select(nodes.c.reputation)
                                          .where(nodes.c.node_id == node_id)).scalar_one())
    return new


def release_quota(conn: Connection, node_id: str, day: str, now: datetime) -> bool:
    """Give back one job of ``day``'s quota (nothing when the node's count is of another day)."""
    result = conn.execute(nodes.update()
                          .where(nodes.c.node_id == node_id, nodes.c.jobs_day == day, nodes.c.jobs_today > 0)
                          .values(jobs_today=nodes.c.jobs_today - 1, updated_at=now))
    return result.rowcount == 1


def _identity(host: str | None, device: DeviceInfo | None) -> dict[str, Any]:
    """Column values for what was given (None leaves the stored value alone)."""
    values: dict[str, Any] = {} if host is None else {"host": host}
    if device is not None:
        values.update(device=device.kind, gpu_name=device.name, gpu_uuid=device.uuid, gpu_memory_mb=device.memory_mb)
    return values


def _node(row: Any) -> NodeRecord:
    device = None
    if row["device"]:
        device = DeviceInfo(row["device"], row["gpu_name"], row["gpu_uuid"], row["gpu_memory_mb"])
    return NodeRecord(
        node_id=row["node_id"], reputation=float(row["reputation"]), updated_at=row["updated_at"], host=row["host"],
        device=device, throughput=dict(row["throughput"] or {}), last_seen_at=row["last_seen_at"],
        daily_quota=row["daily_quota"], jobs_today=int(row["jobs_today"] or 0), jobs_day=row["jobs_day"],
        drained=bool(row["drained"]), drained_reason=row["drained_reason"], registered_at=row["registered_at"])

