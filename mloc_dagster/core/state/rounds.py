"""The slices of a distributed run's rounds: where each range of samples was placed and how it went.

A distributed training run advances in rounds. Round ``k`` is placed on the pool as slices (one
per node, contiguous ranges of the run's sample stream); each slice is its own Dagster run of the
training job; the round merge turns the slices that came in into the round's adapter, recorded as
the run's training job ``k``. This room keeps the slices. State changes that race (a slice
finishing vs. the round merge dropping it as late) are compare-and-set updates, as for jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mloc_dagster.core.state.engine import StoreEngine
from mloc_dagster.core.state.schema import DROPPED, FAILED, QUEUED, REPLACED, RUNNING, SUCCEEDED, round_slices

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
    """What placement decided for one slice (``core.placement.Shard`` mapped onto the stream)."""

    slice_index: int
    node_id: str
    segments: list[list[int]]
    expected_s: float
    replaces: int | None = None


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
        with self._write() as conn:
            result = conn.execute(round_slices.update().where(
                *_key(run_id, round_index, slice_index), round_slices.c.status.in_([QUEUED, RUNNING, FAILED]), *cond)
                .values(status=status, outcome=reason, finished_at=self._clock()))
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


def _key(run_id: str, round_index: int, slice_index: int) -> list[Any]:
    return [c == v for c, v in zip(_KEY, (run_id, round_index, slice_index), strict=True)]


def _slice(row: Mapping[str, Any]) -> RoundSlice:
    names = RoundSlice.__dataclass_fields__
    return RoundSlice(**{k: row[k] for k in names})
