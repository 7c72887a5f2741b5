"""mloc's own state: training runs, their jobs, candidates, promotions and node reputation.

Dagster owns run history and events; this store owns what Dagster has no notion of: the chain a
training run is (status, how far it got), the checkpoint each job left behind and the base model
it was trained on, which adapters went into which candidate, what is in production per dialect and
branch, and how much each node is trusted.

One SQLAlchemy 2 Core schema (``schema.py``), two deployments (SQLite under ``MLOC_HOME``, or
PostgreSQL), one engine and transaction discipline (``engine.py``), and one room per entity:
``runs.py`` (training runs and jobs), ``candidates.py`` (candidates, adapter claims, promotions),
``nodes.py`` (node registry and reputation),
``rounds.py`` (the slices of distributed rounds). ``StateStore`` is all of them over one engine.

All timestamps are UTC. Methods return frozen dataclasses, never ORM rows or open cursors.
A ``StateStore`` must not be shared across ``fork()``: build one per process.
"""

from mloc_dagster.core.state.candidates import (
    RELEASED,
    AdapterClaimConflict,
    AdapterRef,
    Candidate,
    CandidateStore,
    Promotion,
    newest_per_run,
)
from mloc_dagster.core.state.engine import resolve_state_url, retry_transient
from mloc_dagster.core.state.nodes import NodeRecord, NodeStore
from mloc_dagster.core.state.rounds import PlannedSlice, RoundSlice, RoundStore
from mloc_dagster.core.state.runs import InvalidTransition, RunStore, TrainingJob, TrainingRun, UnknownRun
from mloc_dagster.core.state.schema import (
    ACTIVE,
    ADAPTER_BRANCHES,
    ASR,
    CANCELLED,
    COMPLETED,
    DISCARDED,
    DISTRIBUTED,
    DROPPED,
    FAILED,
    HYPERPARAMETER,
    JOB_STATUSES,
    PAUSED,
    PIPELINE,
    QUEUED,
    REPLACED,
    RUN_KINDS,
    RUN_STATUSES,
    RUN_TRANSITIONS,
    RUNNING,
    SINGLE,
    SUCCEEDED,
    TERMINAL_RUN_STATUSES,
    TRACKS,
    TTS,
)

__all__ = [
    "ACTIVE", "ADAPTER_BRANCHES", "CANCELLED", "COMPLETED", "DISCARDED", "DISTRIBUTED", "DROPPED", "FAILED", "HYPERPARAMETER",
    "JOB_STATUSES", "PAUSED", "PIPELINE", "QUEUED", "RELEASED", "REPLACED", "RUNNING", "RUN_KINDS", "RUN_STATUSES",
    "RUN_TRANSITIONS",
    "SINGLE", "SUCCEEDED", "TERMINAL_RUN_STATUSES", "ASR", "TTS", "TRACKS", "PlannedSlice", "RoundSlice",
    "AdapterClaimConflict", "AdapterRef", "Candidate", "InvalidTransition", "NodeRecord", "Promotion",
    "StateStore", "TrainingJob", "TrainingRun", "UnknownRun", "newest_per_run", "resolve_state_url", "retry_transient",
]


class StateStore(RunStore, RoundStore, CandidateStore, NodeStore):
    """SQLAlchemy-backed state store; safe for concurrent writers in several processes."""
