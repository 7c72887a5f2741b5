"""mloc's own state: training runs, their jobs, candidates, promotions and node reputation.

Dagster owns run history and events; this store owns what Dagster has no notion of: the chain a
training run is (status, how far it got), the checkpoint each job left behind, which adapters went
into which candidate, what is in production per dialect and branch, and how much each node is
trusted.

One SQLAlchemy 2 Core schema, two deployments:

- embedded: a SQLite file under ``MLOC_HOME`` (``sqlite:///<MLOC_HOME>/state.db``), written by
  several run workers, the daemon's sensors and the CLI at once -- hence WAL, a generous busy
  timeout, and ``BEGIN IMMEDIATE`` for every write so a transaction never has to upgrade a read
  lock into a write lock (that upgrade is where SQLite answers "database is locked" at once,
  without waiting);
- production: PostgreSQL (``postgresql+psycopg2://...``), READ COMMITTED.

On both, state changes that race (pause vs. the sensor completing a run, the stale-job watchdog
vs. a job finishing) are compare-and-set ``UPDATE ... WHERE status IN (...)`` statements whose row
count says who won. Transactions are short and never span user code.

All timestamps are UTC. Methods return frozen dataclasses, never ORM rows or open cursors.
A ``StateStore`` must not be shared across ``fork()``: build one per process.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "ACTIVE",
    "ADAPTER_BRANCHES",
    "JOB_STATUSES",
    "RUN_STATUSES",
    "RUN_TRANSITIONS",
    "TERMINAL_RUN_STATUSES",
    "AdapterRef",
    "Candidate",
    "InvalidTransition",
    "NodeRecord",
    "Promotion",
    "StateStore",
    "TrainingJob",
    "TrainingRun",
    "UnknownRun",
    "resolve_state_url",
]

# --------------------------------------------------------------------------------------------
# Vocabulary

ACTIVE, PAUSED, CANCELLED, COMPLETED, FAILED = "active", "paused", "cancelled", "completed", "failed"
RUN_STATUSES = (ACTIVE, PAUSED, CANCELLED, COMPLETED, FAILED)
TERMINAL_RUN_STATUSES = frozenset({CANCELLED, COMPLETED, FAILED})
# Which target states each state may move to. Terminal states are final: a cancelled run is not
# resumed, a new run is started instead (its history stays readable).
RUN_TRANSITIONS: Mapping[str, frozenset[str]] = {
    ACTIVE: frozenset({PAUSED, CANCELLED, COMPLETED, FAILED}),
    PAUSED: frozenset({ACTIVE, CANCELLED, FAILED}),
    CANCELLED: frozenset(),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
}

QUEUED, RUNNING, SUCCEEDED = "queued", "running", "succeeded"
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
ADAPTER_BRANCHES = ("stable", "experimental")

_DIALECT_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
DEFAULT_NODE_REPUTATION = 1.0


class UnknownRun(KeyError):
    """No training run with this id."""


class InvalidTransition(ValueError):
    """A status change the state machine never allows (e.g. completed -> active)."""


# --------------------------------------------------------------------------------------------
# Records handed to callers


@dataclass(frozen=True, slots=True)
class TrainingRun:
    run_id: str
    dialect: str
    dataset_version: str
    base_model_version: str
    hparams: dict[str, Any]
    timebox_s: int
    max_jobs: int
    candidate_every: int
    status: str
    status_reason: str | None
    # Highest job_index that succeeded, None while no job has. Job indexes are whatever the
    # caller uses (the training chain numbers them); the store only keeps the maximum.
    last_finished_job: int | None
    created_at: datetime
    updated_at: datetime

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES


@dataclass(frozen=True, slots=True)
class TrainingJob:
    run_id: str
    job_index: int
    status: str
    attempts: int
    dagster_run_id: str | None
    node_id: str | None
    worker_pid: int | None
    worker_host: str | None
    checkpoint_path: str | None
    adapter_sha256: str | None
    metrics: dict[str, Any] | None
    progress: dict[str, Any] | None
    error: str | None
    candidate_id: str | None
    queued_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One adapter that can go into (or went into) a candidate."""

    run_id: str
    job_index: int
    node_id: str | None
    sha256: str | None
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job_index": self.job_index,
            "node_id": self.node_id,
            "sha256": self.sha256,
            "path": self.path,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterRef:
        return cls(
            run_id=str(d["run_id"]),
            job_index=int(d["job_index"]),
            node_id=d.get("node_id"),
            sha256=d.get("sha256"),
            path=str(d["path"]),
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    candidate_id: str
    dialect: str
    created_at: datetime
    adapter_path: str
    sha256: str
    sources: tuple[AdapterRef, ...]
    trusted: bool
    gate_decision: str | None  # None until the gate ran, then "passed" | "failed"
    gate_report_path: str | None
    details: dict[str, Any] | None  # merge summary: method, truncation errors, clipped/rejected


@dataclass(frozen=True, slots=True)
class Promotion:
    promotion_id: int
    dialect: str
    branch: str
    candidate_id: str
    promoted_at: datetime
    adapter_path: str
    sha256: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    reputation: float
    jobs_today: int
    jobs_day: str | None  # UTC date (YYYY-MM-DD) jobs_today counts for
    updated_at: datetime | None


# --------------------------------------------------------------------------------------------
# Schema


class _UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, naive UTC in the database.

    SQLite has no time zones and PostgreSQL's ``timestamptz`` would convert to the session zone;
    storing naive UTC behaves the same on both.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = sa.MetaData()

training_runs = sa.Table(
    "training_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("dialect", sa.String(64), nullable=False, index=True),
    sa.Column("dataset_version", sa.String(128), nullable=False),
    sa.Column("base_model_version", sa.String(128), nullable=False),
    sa.Column("hparams", sa.JSON, nullable=False),
    sa.Column("timebox_s", sa.Integer, nullable=False),
    sa.Column("max_jobs", sa.Integer, nullable=False),
    sa.Column("candidate_every", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("status_reason", sa.Text),
    sa.Column("last_finished_job", sa.Integer),
    sa.Column("created_at", _UtcDateTime, nullable=False),
    sa.Column("updated_at", _UtcDateTime, nullable=False),
)

training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("training_runs.run_id"), primary_key=True),
    sa.Column("job_index", sa.Integer, primary_key=True),  # PK => unique(run_id, job_index)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("dagster_run_id", sa.String(64)),
    sa.Column("node_id", sa.String(128)),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("worker_host", sa.String(255)),
    sa.Column("checkpoint_path", sa.Text),
    sa.Column("adapter_sha256", sa.String(64)),
    sa.Column("metrics", sa.JSON),
    sa.Column("progress", sa.JSON),
    sa.Column("error", sa.Text),
    # Set when a candidate consumed this adapter; NULL = still waiting for the next candidate.
    sa.Column("candidate_id", sa.String(64), index=True),
    sa.Column("queued_at", _UtcDateTime),
    sa.Column("started_at", _UtcDateTime),
    sa.Column("heartbeat_at", _UtcDateTime),
    sa.Column("finished_at", _UtcDateTime),
    # The stale-job watchdog scans running jobs by heartbeat.
    sa.Index("ix_training_jobs_status_heartbeat", "status", "heartbeat_at"),
)

candidates = sa.Table(
    "candidates",
    metadata,
    sa.Column("candidate_id", sa.String(64), primary_key=True),
    sa.Column("dialect", sa.String(64), nullable=False),
    sa.Column("created_at", _UtcDateTime, nullable=False),
    sa.Column("adapter_path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("sources", sa.JSON, nullable=False),
    sa.Column("trusted", sa.Boolean, nullable=False),
    sa.Column("gate_decision", sa.String(16)),
    sa.Column("gate_report_path", sa.Text),
    sa.Column("details", sa.JSON),
    sa.Index("ix_candidates_dialect_created", "dialect", "created_at"),
)

promotions = sa.Table(
    "promotions",
    metadata,
    sa.Column("promotion_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dialect", sa.String(64), nullable=False),
    sa.Column("branch", sa.String(16), nullable=False),
    sa.Column("candidate_id", sa.String(64), sa.ForeignKey("candidates.candidate_id"), nullable=False),
    sa.Column("promoted_at", _UtcDateTime, nullable=False),
    sa.Index("ix_promotions_dialect_branch", "dialect", "branch", "promotion_id"),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.String(128), primary_key=True),
    sa.Column("reputation", sa.Float, nullable=False, default=DEFAULT_NODE_REPUTATION),
    sa.Column("jobs_today", sa.Integer, nullable=False, default=0),
    sa.Column("jobs_day", sa.String(10)),
    sa.Column("updated_at", _UtcDateTime),
)

# Arbitrary constant key for pg_advisory_xact_lock: serializes schema creation across processes.
_SCHEMA_LOCK_KEY = 0x6D6C6F63  # "mloc"


def resolve_state_url(mloc_home: str | os.PathLike[str] | None = None) -> str:
    """``MLOC_DATABASE_URL`` if set, else the SQLite file under ``MLOC_HOME`` (default ``.mloc``)."""
    url = os.environ.get("MLOC_DATABASE_URL")
    if url:
        return url
    home = Path(mloc_home if mloc_home is not None else os.environ.get("MLOC_HOME", ".mloc"))
    return f"sqlite:///{home.resolve() / 'state.db'}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


# --------------------------------------------------------------------------------------------
# The store


class StateStore:
    """SQLAlchemy-backed state store; safe for concurrent writers in several processes.

    ``clock`` exists for tests (stale heartbeats, daily quotas); it must return aware UTC times.
    """

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
        echo: bool = False,
    ) -> None:
        self.url = url
        self._clock = clock
        parsed = sa.engine.make_url(url)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = sa.create_engine(
                url, echo=echo, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}
            )
            _configure_sqlite(self._engine, busy_timeout_s)
        else:
            self._engine = sa.create_engine(url, echo=echo, pool_pre_ping=True)
        # Write transactions take SQLite's write lock up front (BEGIN IMMEDIATE); see module doc.
        self._write_engine = self._engine.execution_options(mloc_write=True)
        self._create_schema()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self._engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    def _create_schema(self) -> None:
        """Create missing tables; safe when several processes construct a store at once.

        ``create_all(checkfirst=True)`` alone races (both see "no table", both CREATE). Holding
        the database's write lock while checking and creating makes it idempotent: SQLite's
        BEGIN IMMEDIATE, PostgreSQL's transaction-scoped advisory lock.
        """
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            metadata.create_all(conn, checkfirst=True)

    def _insert(self, table: sa.Table) -> Any:
        """INSERT supporting ``on_conflict_do_*`` on the back-ends we run on."""
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        if self._is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        raise NotImplementedError(f"state store supports sqlite and postgresql, not {self._engine.dialect.name}")

    # -- training runs -------------------------------------------------------------------------

    def create_run(
        self,
        *,
        dialect: str,
        dataset_version: str,
        base_model_version: str,
        hparams: Mapping[str, Any] | None = None,
        timebox_s: int = 3600,
        max_jobs: int = 6,
        candidate_every: int = 6,
        run_id: str | None = None,
    ) -> TrainingRun:
        if not _DIALECT_RE.match(dialect):
            raise ValueError(f"dialect {dialect!r} must be lowercase [a-z0-9-]")
        if not 1 <= candidate_every <= 12:
            raise ValueError(f"candidate_every must be within 1..12, got {candidate_every}")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        if timebox_s <= 0:
            raise ValueError(f"timebox_s must be > 0, got {timebox_s}")
        now = self._clock()
        values = {
            "run_id": run_id or _new_id("tr"),
            "dialect": dialect,
            "dataset_version": dataset_version,
            "base_model_version": base_model_version,
            "hparams": dict(hparams or {}),
            "timebox_s": int(timebox_s),
            "max_jobs": int(max_jobs),
            "candidate_every": int(candidate_every),
            "status": ACTIVE,
            "status_reason": None,
            "last_finished_job": None,
            "created_at": now,
            "updated_at": now,
        }
        with self._write() as conn:
            conn.execute(training_runs.insert().values(**values))
        return _run_from_row(values)

    def get_run(self, run_id: str) -> TrainingRun | None:
        with self._read() as conn:
            row = conn.execute(sa.select(training_runs).where(training_runs.c.run_id == run_id)).mappings().first()
        return None if row is None else _run_from_row(row)

    def require_run(self, run_id: str) -> TrainingRun:
        run = self.get_run(run_id)
        if run is None:
            raise UnknownRun(run_id)
        return run

    def list_runs(
        self,
        status: str | Iterable[str] | None = None,
        dialect: str | None = None,
        limit: int | None = 100,
    ) -> list[TrainingRun]:
        """Newest first. ``status`` may be one status or several."""
        query = sa.select(training_runs)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query = query.where(training_runs.c.status.in_(statuses))
        if dialect is not None:
            query = query.where(training_runs.c.dialect == dialect)
        query = query.order_by(training_runs.c.created_at.desc(), training_runs.c.run_id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_run_from_row(r) for r in conn.execute(query).mappings()]

    def transition_run(
        self, run_id: str, from_states: str | Iterable[str], to_state: str, reason: str | None = None
    ) -> bool:
        """Compare-and-set the run status: True if the run was in one of ``from_states`` and now
        is ``to_state``; False if it was in another state (someone else moved it first).

        Raises ``InvalidTransition`` for a move the state machine never allows and ``UnknownRun``
        if the run does not exist.
        """
        sources = [from_states] if isinstance(from_states, str) else list(from_states)
        if to_state not in RUN_STATUSES:
            raise ValueError(f"unknown run status {to_state!r}")
        for src in sources:
            if src not in RUN_STATUSES:
                raise ValueError(f"unknown run status {src!r}")
            if to_state not in RUN_TRANSITIONS[src]:
                raise InvalidTransition(f"run status {src} -> {to_state} is not allowed")
        with self._write() as conn:
            result = conn.execute(
                training_runs.update()
                .where(training_runs.c.run_id == run_id, training_runs.c.status.in_(sources))
                .values(status=to_state, status_reason=reason, updated_at=self._clock())
            )
            if result.rowcount == 1:
                return True
            exists = conn.execute(
                sa.select(training_runs.c.run_id).where(training_runs.c.run_id == run_id)
            ).first()
        if exists is None:
            raise UnknownRun(run_id)
        return False

    def set_run_status(self, run_id: str, status: str, reason: str | None = None) -> TrainingRun:
        """Move the run to ``status`` from whatever allowed state it is in.

        Use ``transition_run`` when the decision depends on the state you read (it will not
        overwrite a concurrent change); this is for operator commands ("cancel this run").
        Setting the state a run is already in only updates the reason.
        """
        run = self.require_run(run_id)
        if run.status == status:
            with self._write() as conn:
                conn.execute(
                    training_runs.update()
                    .where(training_runs.c.run_id == run_id)
                    .values(status_reason=reason, updated_at=self._clock())
                )
            return self.require_run(run_id)
        sources = [s for s, targets in RUN_TRANSITIONS.items() if status in targets]
        if not self.transition_run(run_id, sources, status, reason):
            current = self.require_run(run_id)
            raise InvalidTransition(f"run {run_id} is {current.status}; cannot become {status}")
        return self.require_run(run_id)

    # -- training jobs -------------------------------------------------------------------------

    def record_job_queued(self, run_id: str, job_index: int) -> TrainingJob:
        """Note that the job was requested; a no-op if the job is already known."""
        stmt = (
            self._insert(training_jobs)
            .values(run_id=run_id, job_index=job_index, status=QUEUED, attempts=0, queued_at=self._clock())
            .on_conflict_do_nothing(index_elements=["run_id", "job_index"])
        )
        with self._write() as conn:
            conn.execute(stmt)
        job = self.get_job(run_id, job_index)
        assert job is not None
        return job

    def record_job_started(
        self,
        run_id: str,
        job_index: int,
        *,
        dagster_run_id: str | None = None,
        node_id: str | None = None,
        worker_pid: int | None = None,
        worker_host: str | None = None,
    ) -> TrainingJob:
        """Mark the job running (again): every call is one attempt; a retry resets the outcome."""
        now = self._clock()
        started = {
            "status": RUNNING,
            "dagster_run_id": dagster_run_id,
            "node_id": node_id,
            "worker_pid": worker_pid,
            "worker_host": worker_host,
            "started_at": now,
            "heartbeat_at": now,
            "finished_at": None,
            "error": None,
            "progress": None,
        }
        stmt = self._insert(training_jobs).values(
            run_id=run_id, job_index=job_index, attempts=1, queued_at=now, **started
        )
        # Upsert in one statement: no read-then-write window between two workers of one job.
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "job_index"],
            set_={**started, "attempts": training_jobs.c.attempts + 1},
        )
        with self._write() as conn:
            if conn.execute(sa.select(training_runs.c.run_id).where(training_runs.c.run_id == run_id)).first() is None:
                raise UnknownRun(run_id)
            conn.execute(stmt)
            conn.execute(training_runs.update().where(training_runs.c.run_id == run_id).values(updated_at=now))
        job = self.get_job(run_id, job_index)
        assert job is not None
        return job

    def heartbeat(self, run_id: str, job_index: int, progress: Mapping[str, Any] | None = None) -> bool:
        """Refresh a running job's heartbeat (and its progress: step, samples, loss, ETA...).

        False if the job is not running any more -- e.g. the watchdog declared it dead or it was
        cancelled -- which tells the worker to stop.
        """
        values: dict[str, Any] = {"heartbeat_at": self._clock()}
        if progress is not None:
            values["progress"] = dict(progress)
        with self._write() as conn:
            result = conn.execute(
                training_jobs.update()
                .where(
                    training_jobs.c.run_id == run_id,
                    training_jobs.c.job_index == job_index,
                    training_jobs.c.status == RUNNING,
                )
                .values(**values)
            )
        return result.rowcount == 1

    def record_job_finished(
        self,
        run_id: str,
        job_index: int,
        status: str,
        *,
        checkpoint_path: str | None = None,
        sha256: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> TrainingJob:
        """Record the worker's own verdict (``succeeded`` or ``failed``).

        Unconditional on purpose: the worker knows its outcome better than a watchdog that only
        saw late heartbeats. A success also advances the run's ``last_finished_job``.
        """
        if status not in (SUCCEEDED, FAILED):
            raise ValueError(f"a finished job is 'succeeded' or 'failed', not {status!r}")
        if status == SUCCEEDED and not checkpoint_path:
            raise ValueError("a succeeded job must name its checkpoint_path")
        now = self._clock()
        with self._write() as conn:
            result = conn.execute(
                training_jobs.update()
                .where(training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index)
                .values(
                    status=status,
                    checkpoint_path=checkpoint_path,
                    adapter_sha256=sha256,
                    metrics=dict(metrics) if metrics is not None else None,
                    error=error,
                    finished_at=now,
                )
            )
            if result.rowcount != 1:
                raise KeyError(f"job {run_id}/{job_index} was never started")
            run_values: dict[str, Any] = {"updated_at": now}
            if status == SUCCEEDED:
                last = training_runs.c.last_finished_job
                run_values["last_finished_job"] = sa.case(
                    (last.is_(None), job_index), (last < job_index, job_index), else_=last
                )
            conn.execute(training_runs.update().where(training_runs.c.run_id == run_id).values(**run_values))
        job = self.get_job(run_id, job_index)
        assert job is not None
        return job

    def mark_job_failed(
        self,
        run_id: str,
        job_index: int,
        reason: str,
        *,
        if_heartbeat_older_than_s: float | None = None,
    ) -> bool:
        """Compare-and-set a queued/running job to failed; False if it already finished.

        With ``if_heartbeat_older_than_s`` it only fails a job whose heartbeat is still stale at
        the moment of the update, so a watchdog cannot kill a job that just came back to life.
        """
        now = self._clock()
        cond = [
            training_jobs.c.run_id == run_id,
            training_jobs.c.job_index == job_index,
            training_jobs.c.status.in_([QUEUED, RUNNING]),
        ]
        if if_heartbeat_older_than_s is not None:
            cutoff = now - timedelta(seconds=if_heartbeat_older_than_s)
            cond.append(sa.or_(training_jobs.c.heartbeat_at.is_(None), training_jobs.c.heartbeat_at < cutoff))
        with self._write() as conn:
            result = conn.execute(
                training_jobs.update().where(*cond).values(status=FAILED, error=reason, finished_at=now)
            )
        return result.rowcount == 1

    def get_job(self, run_id: str, job_index: int) -> TrainingJob | None:
        with self._read() as conn:
            row = (
                conn.execute(
                    sa.select(training_jobs).where(
                        training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _job_from_row(row)

    def jobs_for_run(self, run_id: str) -> list[TrainingJob]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(training_jobs)
                .where(training_jobs.c.run_id == run_id)
                .order_by(training_jobs.c.job_index)
            ).mappings()
            return [_job_from_row(r) for r in rows]

    def stale_jobs(self, heartbeat_older_than_s: float, *, worker_host: str | None = None) -> list[TrainingJob]:
        """Running jobs whose heartbeat is older than the given age: their worker probably died
        (a SIGKILLed run worker leaves its Dagster run STARTED forever under the default launcher).
        """
        cutoff = self._clock() - timedelta(seconds=heartbeat_older_than_s)
        query = sa.select(training_jobs).where(
            training_jobs.c.status == RUNNING,
            sa.or_(training_jobs.c.heartbeat_at.is_(None), training_jobs.c.heartbeat_at < cutoff),
        )
        if worker_host is not None:
            query = query.where(training_jobs.c.worker_host == worker_host)
        with self._read() as conn:
            return [_job_from_row(r) for r in conn.execute(query.order_by(training_jobs.c.heartbeat_at)).mappings()]

    # -- candidates ----------------------------------------------------------------------------

    def adapters_since_last_candidate(self, dialect: str, *, latest_per_run: bool = False) -> list[AdapterRef]:
        """Succeeded job checkpoints of ``dialect`` (all runs, all nodes) not yet in a candidate.

        "Since the last candidate" is tracked by consumption rather than by timestamps: a
        candidate marks the adapters it merged (``record_candidate``), so an adapter finishing
        while a merge is running is neither lost nor merged twice, whatever the clocks say.

        ``latest_per_run`` keeps only each run's newest checkpoint: the jobs of one run resume
        from each other, so its last checkpoint already contains the earlier ones.
        """
        query = (
            sa.select(
                training_jobs.c.run_id,
                training_jobs.c.job_index,
                training_jobs.c.node_id,
                training_jobs.c.adapter_sha256,
                training_jobs.c.checkpoint_path,
            )
            .join(training_runs, training_runs.c.run_id == training_jobs.c.run_id)
            .where(
                training_runs.c.dialect == dialect,
                training_jobs.c.status == SUCCEEDED,
                training_jobs.c.candidate_id.is_(None),
                training_jobs.c.checkpoint_path.is_not(None),
            )
            .order_by(training_jobs.c.finished_at, training_jobs.c.run_id, training_jobs.c.job_index)
        )
        with self._read() as conn:
            refs = [
                AdapterRef(run_id=r.run_id, job_index=r.job_index, node_id=r.node_id,
                           sha256=r.adapter_sha256, path=r.checkpoint_path)
                for r in conn.execute(query)
            ]
        if latest_per_run:
            newest: dict[str, AdapterRef] = {}
            for ref in refs:
                if ref.run_id not in newest or ref.job_index > newest[ref.run_id].job_index:
                    newest[ref.run_id] = ref
            refs = [r for r in refs if newest[r.run_id] is r]
        return refs

    def record_candidate(
        self,
        *,
        dialect: str,
        adapter_path: str,
        sha256: str,
        sources: Sequence[AdapterRef],
        trusted: bool,
        details: Mapping[str, Any] | None = None,
        candidate_id: str | None = None,
    ) -> Candidate:
        """Store a merged candidate and mark its sources consumed.

        Consumed are the listed sources and, for each run among them, that run's earlier
        succeeded jobs: they are ancestors of the listed checkpoint (see
        ``adapters_since_last_candidate(latest_per_run=True)``).
        """
        now = self._clock()
        cid = candidate_id or _new_id("cand")
        values = {
            "candidate_id": cid,
            "dialect": dialect,
            "created_at": now,
            "adapter_path": adapter_path,
            "sha256": sha256,
            "sources": [s.to_dict() for s in sources],
            "trusted": bool(trusted),
            "gate_decision": None,
            "gate_report_path": None,
            "details": dict(details) if details is not None else None,
        }
        newest_per_run: dict[str, int] = {}
        for s in sources:
            newest_per_run[s.run_id] = max(newest_per_run.get(s.run_id, s.job_index), s.job_index)
        with self._write() as conn:
            conn.execute(candidates.insert().values(**values))
            for run_id, newest in newest_per_run.items():
                conn.execute(
                    training_jobs.update()
                    .where(
                        training_jobs.c.run_id == run_id,
                        training_jobs.c.job_index <= newest,
                        training_jobs.c.status == SUCCEEDED,
                        training_jobs.c.candidate_id.is_(None),
                    )
                    .values(candidate_id=cid)
                )
        return _candidate_from_row(values)

    def set_gate_result(self, candidate_id: str, decision: str, report_path: str | None) -> Candidate:
        if decision not in ("passed", "failed"):
            raise ValueError(f"gate decision is 'passed' or 'failed', not {decision!r}")
        with self._write() as conn:
            result = conn.execute(
                candidates.update()
                .where(candidates.c.candidate_id == candidate_id)
                .values(gate_decision=decision, gate_report_path=report_path)
            )
        if result.rowcount != 1:
            raise KeyError(f"unknown candidate {candidate_id}")
        cand = self.get_candidate(candidate_id)
        assert cand is not None
        return cand

    def get_candidate(self, candidate_id: str) -> Candidate | None:
        with self._read() as conn:
            row = (
                conn.execute(sa.select(candidates).where(candidates.c.candidate_id == candidate_id))
                .mappings()
                .first()
            )
        return None if row is None else _candidate_from_row(row)

    def latest_candidate(self, dialect: str) -> Candidate | None:
        found = self.list_candidates(dialect, limit=1)
        return found[0] if found else None

    def list_candidates(self, dialect: str, limit: int | None = 20) -> list[Candidate]:
        query = (
            sa.select(candidates)
            .where(candidates.c.dialect == dialect)
            .order_by(candidates.c.created_at.desc(), candidates.c.candidate_id.desc())
        )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_candidate_from_row(r) for r in conn.execute(query).mappings()]

    # -- promotions ----------------------------------------------------------------------------

    def record_promotion(self, dialect: str, branch: str, candidate_id: str) -> Promotion:
        if branch not in ADAPTER_BRANCHES:
            raise ValueError(f"branch must be one of {ADAPTER_BRANCHES}, not {branch!r}")
        cand = self.get_candidate(candidate_id)
        if cand is None:
            raise KeyError(f"unknown candidate {candidate_id}")
        if cand.dialect != dialect:
            raise ValueError(f"candidate {candidate_id} is for {cand.dialect}, not {dialect}")
        now = self._clock()
        with self._write() as conn:
            result = conn.execute(
                promotions.insert().values(dialect=dialect, branch=branch, candidate_id=candidate_id, promoted_at=now)
            )
            (promotion_id,) = result.inserted_primary_key
        return Promotion(int(promotion_id), dialect, branch, candidate_id, now, cand.adapter_path, cand.sha256)

    def production(self, dialect: str, branch: str = "stable") -> Promotion | None:
        """What currently serves ``dialect`` on ``branch``: the latest promotion, or None."""
        found = self.list_promotions(dialect, branch=branch, limit=1)
        return found[0] if found else None

    def list_promotions(self, dialect: str, branch: str | None = None, limit: int | None = 20) -> list[Promotion]:
        query = (
            sa.select(promotions, candidates.c.adapter_path, candidates.c.sha256)
            .join(candidates, candidates.c.candidate_id == promotions.c.candidate_id)
            .where(promotions.c.dialect == dialect)
            # promotion_id, not promoted_at: two promotions within one clock tick stay ordered.
            .order_by(promotions.c.promotion_id.desc())
        )
        if branch is not None:
            query = query.where(promotions.c.branch == branch)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [
                Promotion(r.promotion_id, r.dialect, r.branch, r.candidate_id, r.promoted_at, r.adapter_path, r.sha256)
                for r in conn.execute(query)
            ]

    # -- nodes ---------------------------------------------------------------------------------

    def get_node(self, node_id: str) -> NodeRecord:
        """The node's record; an unknown node is a fresh one (full reputation, no jobs today)."""
        with self._read() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).mappings().first()
        if row is None:
            return NodeRecord(node_id, DEFAULT_NODE_REPUTATION, 0, None, None)
        return NodeRecord(row["node_id"], float(row["reputation"]), int(row["jobs_today"]), row["jobs_day"],
                          row["updated_at"])

    def node_reputation(self, node_id: str) -> float:
        return self.get_node(node_id).reputation

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(nodes).order_by(nodes.c.node_id)).mappings()
            return [NodeRecord(r["node_id"], float(r["reputation"]), int(r["jobs_today"]), r["jobs_day"],
                               r["updated_at"]) for r in rows]

    def _ensure_node(self, conn: Connection, node_id: str) -> None:
        conn.execute(
            self._insert(nodes)
            .values(node_id=node_id, reputation=DEFAULT_NODE_REPUTATION, jobs_today=0, jobs_day=None,
                    updated_at=self._clock())
            .on_conflict_do_nothing(index_elements=["node_id"])
        )

    def set_node_reputation(self, node_id: str, reputation: float) -> float:
        value = min(1.0, max(0.0, float(reputation)))
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(
                nodes.update().where(nodes.c.node_id == node_id).values(reputation=value, updated_at=self._clock())
            )
        return value

    def adjust_node_reputation(self, node_id: str, delta: float) -> float:
        """Add ``delta`` atomically (concurrent gate outcomes all count), clamped to [0, 1]."""
        new = nodes.c.reputation + float(delta)
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            conn.execute(
                nodes.update()
                .where(nodes.c.node_id == node_id)
                .values(reputation=sa.case((new > 1.0, 1.0), (new < 0.0, 0.0), else_=new), updated_at=self._clock())
            )
        return self.node_reputation(node_id)

    def try_take_job_quota(self, node_id: str, limit: int = 10) -> bool:
        """Count one training job against the node's daily quota; False if it is used up.

        A single conditional UPDATE, so two jobs racing for the last slot cannot both get it.
        The day rolls over at UTC midnight.
        """
        today = self._today()
        with self._write() as conn:
            self._ensure_node(conn, node_id)
            result = conn.execute(
                nodes.update()
                .where(
                    nodes.c.node_id == node_id,
                    sa.or_(nodes.c.jobs_day.is_(None), nodes.c.jobs_day != today, nodes.c.jobs_today < limit),
                )
                .values(
                    jobs_today=sa.case((nodes.c.jobs_day == today, nodes.c.jobs_today + 1), else_=1),
                    jobs_day=today,
                    updated_at=self._clock(),
                )
            )
        return result.rowcount == 1

    def jobs_today(self, node_id: str) -> int:
        node = self.get_node(node_id)
        return node.jobs_today if node.jobs_day == self._today() else 0

    def _today(self) -> str:
        d: date = self._clock().astimezone(UTC).date()
        return d.isoformat()


# --------------------------------------------------------------------------------------------
# SQLite tuning and row conversion


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN is always
        # DEFERRED); see https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#pysqlite-serializable
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # busy_timeout first: switching to WAL itself needs the lock when another process holds it.
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor vice versa
        cur.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("mloc_write") else "BEGIN")


def _run_from_row(row: Mapping[str, Any]) -> TrainingRun:
    return TrainingRun(
        run_id=row["run_id"],
        dialect=row["dialect"],
        dataset_version=row["dataset_version"],
        base_model_version=row["base_model_version"],
        hparams=dict(row["hparams"] or {}),
        timebox_s=int(row["timebox_s"]),
        max_jobs=int(row["max_jobs"]),
        candidate_every=int(row["candidate_every"]),
        status=row["status"],
        status_reason=row["status_reason"],
        last_finished_job=row["last_finished_job"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _job_from_row(row: Mapping[str, Any]) -> TrainingJob:
    return TrainingJob(
        run_id=row["run_id"],
        job_index=int(row["job_index"]),
        status=row["status"],
        attempts=int(row["attempts"]),
        dagster_run_id=row["dagster_run_id"],
        node_id=row["node_id"],
        worker_pid=row["worker_pid"],
        worker_host=row["worker_host"],
        checkpoint_path=row["checkpoint_path"],
        adapter_sha256=row["adapter_sha256"],
        metrics=row["metrics"],
        progress=row["progress"],
        error=row["error"],
        candidate_id=row["candidate_id"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        finished_at=row["finished_at"],
    )


def _candidate_from_row(row: Mapping[str, Any]) -> Candidate:
    return Candidate(
        candidate_id=row["candidate_id"],
        dialect=row["dialect"],
        created_at=row["created_at"],
        adapter_path=row["adapter_path"],
        sha256=row["sha256"],
        sources=tuple(AdapterRef.from_dict(s) for s in (row["sources"] or [])),
        trusted=bool(row["trusted"]),
        gate_decision=row["gate_decision"],
        gate_report_path=row["gate_report_path"],
        details=row["details"],
    )

