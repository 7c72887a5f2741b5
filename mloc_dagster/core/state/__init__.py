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

from mloc_dagster.core.state.candidates import CandidateStore
from mloc_dagster.core.state.nodes import NodeStore
from mloc_dagster.core.state.rounds import RoundStore
from mloc_dagster.core.state.runs import RunStore


class StateStore(RunStore, RoundStore, CandidateStore, NodeStore):
    """SQLAlchemy-backed state store; safe for concurrent writers in several processes."""
