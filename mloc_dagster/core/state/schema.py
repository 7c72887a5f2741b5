"""The state store's vocabulary and schema (SQLAlchemy Core), and how it is created and migrated.

Schema changes are additive and applied idempotently on SQLite and PostgreSQL alike: missing
tables are created, missing (nullable) columns are added with ``ALTER TABLE ... ADD COLUMN``, and on PostgreSQL a
``VARCHAR(n)`` column the schema now declares ``TEXT`` is widened in place (SQLite never enforced
the length), all
under the database's write lock so several processes starting at once agree. A column is never
renamed or dropped in place; a release that needs that ships an alembic migration.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# --------------------------------------------------------------------------------------------
# Vocabulary

ACTIVE, PAUSED, CANCELLED, COMPLETED, FAILED = "active", "paused", "cancelled", "completed", "failed"
RUN_STATUSES = (ACTIVE, PAUSED, CANCELLED, COMPLETED, FAILED)
TERMINAL_RUN_STATUSES = frozenset({CANCELLED, COMPLETED, FAILED})
# Which target states each state may move to. Terminal states are final: a cancelled run is not
# resumed, a new run is started instead (its history stays readable). One exception: a run that
# failed because a job exhausted its retries is re-activated by the replay of that job
# (`mloc run replay`, training_runs.reactivate_run).
RUN_TRANSITIONS: Mapping[str, frozenset[str]] = {
    ACTIVE: frozenset({PAUSED, CANCELLED, COMPLETED, FAILED}),
    PAUSED: frozenset({ACTIVE, CANCELLED, FAILED}),
    CANCELLED: frozenset(),
    COMPLETED: frozenset(),
    FAILED: frozenset({ACTIVE}),
}

# A job that finishes after its training run was cancelled is kept (checkpoint, metrics) as
# ``discarded``: never merged, never resumed from.
QUEUED, RUNNING, SUCCEEDED, DISCARDED = "queued", "running", "succeeded", "discarded"
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DISCARDED)
ADAPTER_BRANCHES = ("stable", "experimental")
# Training run kinds: a chain of single-node jobs; rounds of slices on several nodes merged after
# each round; a hyperparameter search whose trials are single runs (``parent_run_id``); a pipeline
# of declared stages (``spec``) whose training stages are runs too.
SINGLE, DISTRIBUTED, HYPERPARAMETER, PIPELINE = "single", "distributed", "hyperparameter", "pipeline"
RUN_KINDS = (SINGLE, DISTRIBUTED, HYPERPARAMETER, PIPELINE)
# What a training run trains (issue 11): speech recognition or synthesis adapters. NULL: asr.
ASR, TTS = "asr", "tts"
TRACKS = (ASR, TTS)
# A slice of a distributed round: queued → running → succeeded | failed; ``dropped`` when the
# round merged without it (late, failed, its run ended), ``replaced`` when its node stopped
# heartbeating and its samples went to another node.
DROPPED, REPLACED = "dropped", "replaced"
SLICE_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DROPPED, REPLACED)
DEFAULT_NODE_REPUTATION = 1.0


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
    sa.Column("dataset_version", sa.Text, nullable=False),  # a directory: any length
    sa.Column("base_model_version", sa.Text, nullable=False),  # the base model's directory
    sa.Column("hparams", sa.JSON, nullable=False),
    sa.Column("timebox_s", sa.Integer, nullable=False),
    sa.Column("max_jobs", sa.Integer, nullable=False),
    sa.Column("candidate_every", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("status_reason", sa.Text),
    sa.Column("last_finished_job", sa.Integer),
    sa.Column("created_at", _UtcDateTime, nullable=False),
    sa.Column("updated_at", _UtcDateTime, nullable=False),
    # Warm start: the adapter job 0 starts from (a promoted or candidate adapter of the dialect).
    sa.Column("init_from", sa.String(128)),  # what the user named: "production:stable", a candidate id
    sa.Column("init_adapter", sa.Text),  # its directory
    # Bumped on every resume: the chain's run keys carry it, so a job re-requested after a pause
    # gets a new key while a sensor tick repeated within one generation still launches once.
    sa.Column("generation", sa.Integer),
    sa.Column("kind", sa.String(16)),  # RUN_KINDS; NULL: single
    sa.Column("parallelism", sa.Integer),  # distributed: slices per round (at most)
    sa.Column("round_samples", sa.Integer),  # distributed: samples per round
    # distributed: round 0 trained on one node (the fastest), the rounds after it pooled. NULL: no
    sa.Column("first_round_on_one_node", sa.Boolean),
    # The base dialect's dataset version mixed into every job against forgetting, pinned at start
    # (a resumed job must see the rows its checkpoint was trained on). "": none; NULL: not pinned.
    sa.Column("rehearsal_dataset", sa.Text),
    # A trial of a hyperparameter search: the search's run id and the Optuna trial number.
    sa.Column("parent_run_id", sa.String(64), index=True),
    sa.Column("trial_number", sa.Integer),
    sa.Column("spec", sa.JSON),  # a pipeline's stages (core/training/pipeline.py)
    sa.Column("track", sa.String(8)),  # TRACKS; NULL: asr
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
    # Set when a candidate claimed this adapter; NULL = still waiting for the next candidate.
    sa.Column("candidate_id", sa.String(64), index=True),
    sa.Column("queued_at", _UtcDateTime),
    sa.Column("started_at", _UtcDateTime),
    sa.Column("heartbeat_at", _UtcDateTime),
    sa.Column("finished_at", _UtcDateTime),
    sa.Column("base_model", sa.String(128)),  # hash of the base model the adapter was trained on
    # The stale-job watchdog scans running jobs by heartbeat.
    sa.Index("ix_training_jobs_status_heartbeat", "status", "heartbeat_at"),
)

# The slices of a distributed run's rounds. A round's merged adapter is the run's training job
# ``job_index = round_index`` (so candidates, warm starts and the chain treat it like any job's adapter).
round_slices = sa.Table(
    "round_slices",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("training_runs.run_id"), primary_key=True),
    sa.Column("round_index", sa.Integer, primary_key=True),
    sa.Column("slice_index", sa.Integer, primary_key=True),
    sa.Column("node_id", sa.String(128), nullable=False),
    sa.Column("segments", sa.JSON, nullable=False),  # [[start, stop), ...] of the run's sample stream
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("expected_s", sa.Float, nullable=False),  # samples / the node's measured throughput
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("replaces", sa.Integer),  # the slice whose samples this one took over
    sa.Column("dagster_run_id", sa.String(64)),
    sa.Column("checkpoint_path", sa.Text),
    sa.Column("adapter_sha256", sa.String(64)),
    sa.Column("metrics", sa.JSON),
    sa.Column("progress", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("outcome", sa.Text),  # the round merge's verdict: accepted (weight...) or why not
    sa.Column("queued_at", _UtcDateTime),
    sa.Column("started_at", _UtcDateTime),
    sa.Column("train_started_at", _UtcDateTime),  # first step: the slice's expected time counts from here
    sa.Column("train_ended_at", _UtcDateTime),  # last step: evaluation and save follow, never late from here
    sa.Column("heartbeat_at", _UtcDateTime),
    sa.Column("finished_at", _UtcDateTime),
)

# What each round merge made of its slices (issue 21): the nodes inside the round's adapter (the
# run's job ``round_index``) and inside its experimental sibling when some slice came from a node
# below the trust bar, and the reputation moves the merge applied -- once per (run, round): a
# retried merge finds the row and applies nothing again.
round_merges = sa.Table(
    "round_merges",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("training_runs.run_id"), primary_key=True),
    sa.Column("round_index", sa.Integer, primary_key=True),
    sa.Column("nodes", sa.JSON, nullable=False),  # {node_id: merged samples}, the start adapter's included
    # Every slice inside the round's adapter (its start adapter's included) came from a node at or
    # above the trust bar when it was merged: the adapter may enter a stable candidate.
    sa.Column("trusted", sa.Boolean),
    sa.Column("experimental_path", sa.Text),  # every slice merged, when some are below the trust bar
    sa.Column("experimental_sha256", sa.String(64)),
    sa.Column("experimental_nodes", sa.JSON),
    sa.Column("reputation", sa.JSON),  # {node_id: {"reason": ..., "after": float}} as applied
    sa.Column("recorded_at", _UtcDateTime, nullable=False),
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
    sa.Column("base_model", sa.String(128)),  # hash: a candidate is gated and served on this base only
    sa.Column("base_model_path", sa.Text),
    sa.Column("dataset_version", sa.Text),  # whose test split the gate evaluates
    sa.Column("dagster_run_id", sa.String(64)),  # the Dagster run that merged it (its root run)
    sa.Column("training_run_id", sa.String(64)),  # the training run whose chain requested it, if any
    sa.Column("track", sa.String(8)),  # TRACKS; NULL: asr
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
    # The node registry (issue 10); every column nullable so existing stores migrate in place.
    sa.Column("host", sa.String(255)),
    sa.Column("device", sa.String(16)),  # "cuda" | "cpu"
    sa.Column("gpu_name", sa.String(255)),
    sa.Column("gpu_uuid", sa.String(64)),
    sa.Column("gpu_memory_mb", sa.Integer),
    # {base_model_hash: {"samples_per_s": float, "at": iso, "source": "job" | "calibrate", "jobs": int}}
    sa.Column("throughput", sa.JSON),
    sa.Column("last_seen_at", _UtcDateTime),  # heartbeats; unseen for longer than the TTL = unavailable
    sa.Column("daily_quota", sa.Integer),  # NULL: the deployment default (10 jobs a day)
    sa.Column("drained", sa.Boolean),  # NULL/false: may take new work
    sa.Column("drained_reason", sa.Text),
    sa.Column("registered_at", _UtcDateTime),
)

# Arbitrary constant key for pg_advisory_xact_lock: serializes schema changes across processes.
SCHEMA_LOCK_KEY = 0x6D6C6F63  # "mloc"


def create_or_migrate(conn: Connection) -> list[str]:
    """Create missing tables and add missing columns; returns the columns added ("table.column").

    Run inside a write transaction that holds the schema lock (see ``engine.StoreEngine``).
    """
    metadata.create_all(conn, checkfirst=True)
    inspector = sa.inspect(conn)
    added = []
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.primary_key:
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{column.name} in place; "
                                   "ship an alembic migration")
            ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
            added.append(f"{table.name}.{column.name}")
        added += widen_to_text(conn, table, inspector)
    return added


def widen_to_text(conn: Connection, table: sa.Table, inspector) -> list[str]:
    """PostgreSQL: widen the ``VARCHAR(n)`` columns the schema now declares ``TEXT`` (paths that
    outgrew 128 characters); returns them as "table.column". SQLite ignores lengths."""
    if conn.dialect.name != "postgresql":
        return []
    found = {c["name"]: c["type"] for c in inspector.get_columns(table.name)}
    widened = []
    for column in table.columns:
        present = found.get(column.name)
        if isinstance(column.type, sa.Text) and getattr(present, "length", None) is not None:
            conn.execute(sa.text(f"ALTER TABLE {table.name} ALTER COLUMN {column.name} TYPE TEXT"))
            widened.append(f"{table.name}.{column.name}")
    return widened
