"""The slices of a distributed run's rounds: where each range of samples was placed and how it went.

A distributed training run advances in rounds. Round ``k`` is placed on the pool as slices (one
per node, contiguous ranges of the run's sample stream); each slice is its own Dagster run of the
training job; the round merge turns the slices that came in into the round's adapter, recorded as
the run's training job ``k``. This room keeps the slices and what each round merge made of them
(``RoundMerge``: the nodes inside the round's adapter, its experimental sibling, the reputation
moves it applied, once per round). State changes that race (a slice finishing vs. the round merge
dropping it as late) are compare-and-set updates, as for jobs. A slice that ends without ever
having started gives its node's quota back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from mloc_dagster.core.state.engine import StoreEngine
from mloc_dagster.core.state.nodes import apply_reputation, release_quota
from mloc_dagster.core.state.schema import (
    DROPPED,
    FAILED,
    QUEUED,
    REPLACED,
    RUNNING,
    SUCCEEDED,
    round_merges,
    round_slices,
)

if TYPE_CHECKING:
    from mloc_dagster.core.pool.reputation import ReputationUpdate
    from mloc_dagster.core.state.candidates import AdapterRef

_KEY = (round_slices.c.run_id, round_slices.c.round_index, round_slices.c.slice_index)


@dataclass(frozen=True, slots=True)
class RoundSlice:
    run_id: str
    round_index: int
    slice_index: int
    node_id: str
    segments: list[list[int]]
    samples: int
    expected_s: float
    status: str
    attempts: int
    replaces: int | None
    dagster_run_id: str | None
    checkpoint_path: str | None
    adapter_sha256: str | None
    metrics: dict[str, Any] | None
    progress: dict[str, Any] | None
    error: str | None
    outcome: str | None
    queued_at: datetime | None
    started_at: datetime | None
    train_started_at: datetime | None
    train_ended_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    @property
    def in_flight(self) -> bool:
        return self.status in (QUEUED, RUNNING)


@dataclass(frozen=True, slots=True)
class PlannedSlice:
    """What placement decided for one slice (``core.pool.placement.Shard`` mapped onto the stream)."""

    slice_index: int
    node_id: str
    segments: list[list[int]]
    expected_s: float
    replaces: int | None = None


@dataclass(frozen=True, slots=True)
class RoundMerge:
    """What a round merge made: ``nodes`` inside the round's adapter (the run's job ``round_index``,
    its start adapter's nodes included) as {node: merged samples}; the experimental sibling (every
    slice merged) when some slice came from a node below the trust bar; the reputation moves the
    merge applied ({node: {"reason", "after"}}); ``trusted``: every slice inside the round's
    adapter came from a node at or above the trust bar when it was merged."""

    run_id: str
    round_index: int
    nodes: dict[str, float]
    trusted: bool
    experimental_path: str | None
    experimental_sha256: str | None
    experimental_nodes: dict[str, float] | None
    reputation: dict[str, dict[str, Any]]
    recorded_at: datetime


class RoundStore(StoreEngine):
    """Slices of distributed rounds."""

    def place_slices(self, run_id: str, round_index: int, planned: Sequence[PlannedSlice]) -> list[RoundSlice]:
        """Record a placement (idempotent: a slice index already recorded is kept as it is, so a
        sensor tick repeated after a crash re-requests the same slices); returns the round's slices."""
        now = self._clock()
        with self._write() as conn:
            for p in planned:
                conn.execute(self._insert(round_slices).values(
                    run_id=run_id, round_index=round_index, slice_index=p.slice_index, node_id=p.node_id,
                    segments=[list(s) for s in p.segments], samples=sum(b - a for a, b in p.segments),
                    expected_s=float(p.expected_s), status=QUEUED, attempts=0, replaces=p.replaces, queued_at=now,
                ).on_conflict_do_nothing(index_elements=["run_id", "round_index", "slice_index"]))
        return self.round_slices(run_id, round_index)

    def round_slices(self, run_id: str, round_index: int) -> list[RoundSlice]:
        with self._read() as conn:
            rows = conn.execute(sa.select(round_slices).where(
                round_slices.c.run_id == run_id, round_slices.c.round_index == round_index)
                .order_by(round_slices.c.slice_index)).mappings()
            return [_slice(r) for r in rows]

    def get_slice(self, run_id: str, round_index: int, slice_index: int) -> RoundSlice | None:
        with self._read() as conn:
            row = conn.execute(sa.select(round_slices).where(*_key(run_id, round_index, slice_index))).mappings().first()
        return None if row is None else _slice(row)

    def record_slice_started(self, run_id: str, round_index: int, slice_index: int, *,
                             dagster_run_id: str | None) -> bool:
        """Queued (or a retried running/failed attempt) → running; False if the round already
        dropped or replaced it: the slice must not train."""
        now = self._clock()
        with self._write() as conn:
            result = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status.in_([QUEUED, RUNNING, FAILED]))
                .values(status=RUNNING, attempts=round_slices.c.attempts + 1, dagster_run_id=dagster_run_id,
                        started_at=now, heartbeat_at=now, train_started_at=None, train_ended_at=None, error=None,
                        finished_at=None))
        return result.rowcount == 1

    def slice_training_started(self, run_id: str, round_index: int, slice_index: int) -> None:
        with self._write() as conn:
            conn.execute(round_slices.update().where(*_key(run_id, round_index, slice_index))
                         .values(train_started_at=self._clock(), heartbeat_at=self._clock()))

    def slice_training_ended(self, run_id: str, round_index: int, slice_index: int) -> None:
        """The last step is done: its evaluation and save follow, and the slice is no longer late."""
        with self._write() as conn:
            conn.execute(round_slices.update().where(*_key(run_id, round_index, slice_index))
                         .values(train_ended_at=self._clock(), heartbeat_at=self._clock()))

    def heartbeat_slice(self, run_id: str, round_index: int, slice_index: int,
                        progress: Mapping[str, Any] | None = None) -> bool:
        """False once the slice is no longer running (dropped as late, replaced): stop training."""
        values: dict[str, Any] = {"heartbeat_at": self._clock()}
        if progress is not None:
            values["progress"] = dict(progress)
        with self._write() as conn:
            result = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status == RUNNING).values(**values))
        return result.rowcount == 1

    def record_slice_finished(self, run_id: str, round_index: int, slice_index: int, status: str, *,
                              checkpoint_path: str | None = None, sha256: str | None = None,
                              metrics: Mapping[str, Any] | None = None, error: str | None = None) -> RoundSlice:
        """The worker's verdict. A slice the round already dropped keeps that status (it is not
        merged) but its checkpoint and metrics are recorded: nothing is lost."""
        if status not in (SUCCEEDED, FAILED):
            raise ValueError(f"a finished slice is 'succeeded' or 'failed', not {status!r}")
        values = {"checkpoint_path": checkpoint_path, "adapter_sha256": sha256, "finished_at": self._clock(),
                  "metrics": dict(metrics) if metrics is not None else None}
        with self._write() as conn:
            done = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status == RUNNING)
                .values(status=status, error=error, **values)).rowcount
            if not done:
                conn.execute(round_slices.update().where(*_key(run_id, round_index, slice_index)).values(**values))
        found = self.get_slice(run_id, round_index, slice_index)
        if found is None:
            raise KeyError(f"slice {run_id}/{round_index}/{slice_index} was never placed")
        return found

    def end_slice(self, run_id: str, round_index: int, slice_index: int, status: str, reason: str, *,
                  still_training: bool = False) -> bool:
        """Compare-and-set a slice that is still queued, running (or failed) to ``dropped`` or
        ``replaced`` with the reason; False if it finished first (with ``still_training``: or its
        training ended first, so a late drop never takes a slice that is evaluating or saving)."""
        if status not in (DROPPED, REPLACED):
            raise ValueError(f"end_slice sets 'dropped' or 'replaced', not {status!r}")
        cond = [round_slices.c.train_ended_at.is_(None)] if still_training else []
        values = {"status": status, "outcome": reason, "finished_at": self._clock()}
        with self._write() as conn:
            never_started = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status == QUEUED,
                round_slices.c.attempts == 0).values(**values).returning(round_slices.c.node_id,
                                                                         round_slices.c.queued_at)).first()
            if never_started is not None:  # the quota placement took for it was never used
                day = (never_started.queued_at or self._clock()).date().isoformat()
                release_quota(conn, never_started.node_id, day, self._clock())
                return True
            result = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status.in_([QUEUED, RUNNING, FAILED]), *cond)
                .values(**values))
        return result.rowcount == 1

    def requeue_slice(self, run_id: str, round_index: int, slice_index: int, reason: str, *,
                      dagster_run_id: str) -> bool:
        """Compare-and-set a slice that is still queued, running or failed back to ``queued`` with
        the reason (its Dagster run ``dagster_run_id`` was canceled: the next generation of run
        keys requests it again); False if it finished, the round dropped or replaced it, or
        another Dagster run trains it, first."""
        c = round_slices.c
        with self._write() as conn:
            result = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), c.status.in_([QUEUED, RUNNING, FAILED]),
                sa.or_(c.status != RUNNING, c.dagster_run_id.is_(None), c.dagster_run_id == dagster_run_id))
                .values(status=QUEUED, outcome=reason, train_started_at=None, train_ended_at=None))
        return result.rowcount == 1

    def set_slice_outcome(self, run_id: str, round_index: int, slice_index: int, outcome: str) -> None:
        """The round merge's verdict on a slice that came in (accepted with its weight, or refused and why)."""
        with self._write() as conn:
            conn.execute(round_slices.update().where(*_key(run_id, round_index, slice_index)).values(outcome=outcome))

    def silent_slices(self, run_id: str, round_index: int, older_than_s: float) -> list[RoundSlice]:
        """Running slices whose heartbeat is older than ``older_than_s``: their node went away."""
        cutoff = self._clock() - timedelta(seconds=older_than_s)
        return [s for s in self.round_slices(run_id, round_index)
                if s.status == RUNNING and (s.heartbeat_at is None or s.heartbeat_at < cutoff)]


    # -- round merges ---------------------------------------------------------------------------------

    def record_round_merge(self, run_id: str, round_index: int, *, nodes: Mapping[str, float], trusted: bool,
                           updates: Mapping[str, ReputationUpdate], experimental_path: str | None = None,
                           experimental_sha256: str | None = None,
                           experimental_nodes: Mapping[str, float] | None = None) -> RoundMerge:
        """Record what the round merge made and apply its reputation ``updates``, in one
        transaction keyed by (run, round): a retried merge updates what it made but applies no
        reputation move again (the first attempt's moves stay recorded)."""
        now = self._clock()
        made = {"nodes": dict(nodes), "trusted": bool(trusted), "experimental_path": experimental_path,
                "experimental_sha256": experimental_sha256,
                "experimental_nodes": None if experimental_nodes is None else dict(experimental_nodes)}
        key = [round_merges.c.run_id == run_id, round_merges.c.round_index == round_index]
        with self._write() as conn:
            first = conn.execute(self._insert(round_merges).values(
                run_id=run_id, round_index=round_index, recorded_at=now, reputation={}, **made)
                .on_conflict_do_nothing(index_elements=["run_id", "round_index"])).rowcount == 1
            if first:
                after = apply_reputation(conn, updates, now, self._insert)
                made["reputation"] = {n: {"reason": u.reason, "after": after[n]} for n, u in sorted(updates.items())}
            conn.execute(round_merges.update().where(*key).values(**made))
        found = self.round_merge(run_id, round_index)
        assert found is not None
        return found

    def round_merge(self, run_id: str, round_index: int) -> RoundMerge | None:
        with self._read() as conn:
            row = conn.execute(sa.select(round_merges).where(
                round_merges.c.run_id == run_id, round_merges.c.round_index == round_index)).mappings().first()
        if row is None:
            return None
        return RoundMerge(run_id=row["run_id"], round_index=row["round_index"], nodes=dict(row["nodes"] or {}),
                          trusted=row["trusted"] is not False,
                          experimental_path=row["experimental_path"], experimental_sha256=row["experimental_sha256"],
                          experimental_nodes=row["experimental_nodes"], reputation=dict(row["reputation"] or {}),
                          recorded_at=row["recorded_at"])

    def adapter_nodes(self, ref: AdapterRef) -> dict[str, float]:
        """The nodes inside an adapter and how much of it each trained: a job's node; a round
        adapter's (or its experimental sibling's) merged nodes by samples; {} for neither."""
        if ref.node_id:
            return {ref.node_id: 1.0}
        merge = self.round_merge(ref.run_id, ref.job_index)
        if merge is None:
            return {}
        if merge.experimental_path and ref.path == merge.experimental_path:
            return dict(merge.experimental_nodes or {})
        return dict(merge.nodes)


def _key(run_id: str, round_index: int, slice_index: int) -> list[Any]:
    return [c == v for c, v in zip(_KEY, (run_id, round_index, slice_index), strict=True)]


def _slice(row: Mapping[str, Any]) -> RoundSlice:
    names = RoundSlice.__dataclass_fields__
    return RoundSlice(**{k: row[k] for k in names})
