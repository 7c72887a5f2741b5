"""Training runs and their jobs: the chain a run is, the checkpoint each job left behind.

State changes that race (pause vs. the sensor completing a run, the stale-job watchdog vs. a job
finishing) are compare-and-set ``UPDATE ... WHERE status IN (...)`` statements whose row count
says who won. Transactions are short and never span user code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mloc_dagster.core.state.engine import StoreEngine, new_id
from mloc_dagster.core.state.schema import (
    ACTIVE,
    ASR,
    CANCELLED,
    COMPLETED,
    DISCARDED,
    DISTRIBUTED,
    FAILED,
    QUEUED,
    RUN_KINDS,
    RUN_STATUSES,
    RUN_TRANSITIONS,
    RUNNING,
    SINGLE,
    SUCCEEDED,
    TERMINAL_RUN_STATUSES,
    TRACKS,
    training_jobs,
    training_runs,
)

_DIALECT_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class UnknownRun(KeyError):
    """No training run with this id."""


class InvalidTransition(ValueError):
    """A status change the state machine never allows (e.g. completed -> active)."""


@dataclass(frozen=True, slots=True)
class TrainingRun:
    run_id: str
    dialect: str
    dataset_version: str
    base_model_version: str  # the base model's directory (its name is the model's content hash)
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
    init_from: str | None = None  # warm start: what the user named (production:stable, a candidate id)
    init_adapter: str | None = None  # warm start: the adapter directory job 0 starts from
    generation: int = 0  # bumped by every resume; part of the chain's run keys
    kind: str = SINGLE  # single: one job at a time; distributed: rounds of slices (max_jobs = rounds)
    parallelism: int = 1  # distributed: slices per round, at most
    round_samples: int = 0  # distributed: samples per round
    first_round_on_one_node: bool = False  # distributed: round 0 on one node, then pooled (post-local)
    rehearsal_dataset: str | None = None  # pinned base-dialect dataset version; "": none; None: not pinned
    parent_run_id: str | None = None  # a trial: the hyperparameter search it belongs to
    trial_number: int | None = None
    spec: dict[str, Any] | None = None  # a pipeline's stages
    track: str = ASR  # asr | tts: which model the adapters adapt (its own base, jobs, candidates)

    @property
    def distributed(self) -> bool:
        return self.kind == DISTRIBUTED

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
    base_model: str | None = None  # hash of the base model the adapter was trained on


class RunStore(StoreEngine):
    """Training runs (status machine) and training jobs (one per timeboxed Dagster run)."""

    # -- training runs -------------------------------------------------------------------------

    def create_run(self, *, dialect: str, dataset_version: str, base_model_version: str,
                   hparams: Mapping[str, Any] | None = None, timebox_s: int = 3600, max_jobs: int = 6,
                   candidate_every: int = 6, run_id: str | None = None, init_from: str | None = None,
                   init_adapter: str | None = None, kind: str = SINGLE, parallelism: int = 1,
                   round_samples: int = 0, first_round_on_one_node: bool = False,
                   rehearsal_dataset: str | None = None,
                   parent_run_id: str | None = None, trial_number: int | None = None,
                   spec: Mapping[str, Any] | None = None, track: str = ASR) -> TrainingRun:
        if not _DIALECT_RE.match(dialect):
            raise ValueError(f"dialect {dialect!r} must be lowercase [a-z0-9-]")
        if not 1 <= candidate_every <= 12:
            raise ValueError(f"candidate_every must be within 1..12, got {candidate_every}")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        if timebox_s <= 0:
            raise ValueError(f"timebox_s must be > 0, got {timebox_s}")
        if track not in TRACKS:
            raise ValueError(f"track {track!r} is not one of {', '.join(TRACKS)}")
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind {kind!r} is not one of {', '.join(RUN_KINDS)}")
        if kind == DISTRIBUTED and (parallelism < 1 or round_samples < parallelism):
            raise ValueError(f"a {kind} run needs parallelism >= 1 and round_samples >= parallelism, "
                             f"got {parallelism} and {round_samples}")
        now = self._clock()
        values = {
            "run_id": run_id or new_id("tr"), "dialect": dialect, "dataset_version": dataset_version,
            "base_model_version": base_model_version, "hparams": dict(hparams or {}), "timebox_s": int(timebox_s),
            "max_jobs": int(max_jobs), "candidate_every": int(candidate_every), "status": ACTIVE,
            "status_reason": None, "last_finished_job": None, "created_at": now, "updated_at": now,
            "init_from": init_from, "init_adapter": init_adapter, "generation": 0, "kind": kind,
            "parallelism": int(parallelism) if kind != SINGLE else None,
            "round_samples": int(round_samples) if kind == DISTRIBUTED else None,
            "first_round_on_one_node": bool(first_round_on_one_node) if kind == DISTRIBUTED else None,
            "rehearsal_dataset": rehearsal_dataset, "parent_run_id": parent_run_id, "trial_number": trial_number,
            "spec": dict(spec) if spec is not None else None, "track": track,
        }
        with self._write() as conn:
            conn.execute(training_runs.insert().values(**values))
        return _run_from_row(values)

    def get_run(self, run_id: str) -> TrainingRun | None:
        with self._read() as conn:
            row = conn.execute(sa.select(training_runs).where(training_runs.c.run_id == run_id)).mappings().first()
        return None if row is None else _run_from_row(row)

    def list_runs(self, status: str | Iterable[str] | None = None, dialect: str | None = None,
                  limit: int | None = 100, parent_run_id: str | None = None) -> list[TrainingRun]:
        """Newest first. ``status`` may be one status or several; ``parent_run_id``: a search's trials."""
        query = sa.select(training_runs)
        if parent_run_id is not None:
            query = query.where(training_runs.c.parent_run_id == parent_run_id)
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

    def transition_run(self, run_id: str, from_states: str | Iterable[str], to_state: str,
                       reason: str | None = None) -> bool:
        """Compare-and-set the run status: True if the run was in one of ``from_states`` and now
        is ``to_state``; False if it was in another state (someone else moved it first).

        Becoming active again (resume) starts a new generation of the chain's run keys.
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
        values: dict[str, Any] = {"status": to_state, "status_reason": reason, "updated_at": self._clock()}
        if to_state == ACTIVE:
            values["generation"] = sa.func.coalesce(training_runs.c.generation, 0) + 1
        with self._write() as conn:
            result = conn.execute(
                training_runs.update()
                .where(training_runs.c.run_id == run_id, training_runs.c.status.in_(sources))
                .values(**values)
            )
            if result.rowcount == 1:
                return True
            exists = conn.execute(sa.select(training_runs.c.run_id).where(training_runs.c.run_id == run_id)).first()
        if exists is None:
            raise UnknownRun(run_id)
        return False

    # -- training jobs -------------------------------------------------------------------------

    def record_job_queued(self, run_id: str, job_index: int) -> TrainingJob:
        """Note that the job was requested; a job that failed before (a re-request after a resume)
        is queued again, any other known job is left as it is."""
        now = self._clock()
        stmt = (self._insert(training_jobs)
                .values(run_id=run_id, job_index=job_index, status=QUEUED, attempts=0, queued_at=now)
                .on_conflict_do_nothing(index_elements=["run_id", "job_index"]))
        with self._write() as conn:
            conn.execute(stmt)
            conn.execute(training_jobs.update()
                         .where(training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index,
                                training_jobs.c.status == FAILED)
                         .values(status=QUEUED, queued_at=now, error=None, finished_at=None))
        job = self.get_job(run_id, job_index)
        assert job is not None
        return job

    def record_job_started(self, run_id: str, job_index: int, *, dagster_run_id: str | None = None,
                           node_id: str | None = None, worker_pid: int | None = None,
                           worker_host: str | None = None) -> TrainingJob:
        """Mark the job running (again): every call is one attempt; a retry resets the outcome."""
        now = self._clock()
        started = {
            "status": RUNNING, "dagster_run_id": dagster_run_id, "node_id": node_id, "worker_pid": worker_pid,
            "worker_host": worker_host, "started_at": now, "heartbeat_at": now, "finished_at": None,
            "error": None, "progress": None,
        }
        stmt = self._insert(training_jobs).values(run_id=run_id, job_index=job_index, attempts=1, queued_at=now,
                                                  **started)
        # Upsert in one statement: no read-then-write window between two workers of one job.
        stmt = stmt.on_conflict_do_update(index_elements=["run_id", "job_index"],
                                          set_={**started, "attempts": training_jobs.c.attempts + 1})
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
                .where(training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index,
                       training_jobs.c.status == RUNNING)
                .values(**values)
            )
        return result.rowcount == 1

    def record_job_finished(self, run_id: str, job_index: int, status: str, *, checkpoint_path: str | None = None,
                            sha256: str | None = None, metrics: Mapping[str, Any] | None = None,
                            error: str | None = None, base_model: str | None = None) -> TrainingJob:
        """Record the worker's own verdict (``succeeded`` or ``failed``).

        Unconditional on purpose: the worker knows its outcome better than a watchdog that only
        saw late heartbeats. A success also advances the run's ``last_finished_job`` -- unless the
        run was cancelled meanwhile: then the job is kept as ``discarded`` (recorded, never merged).
        The run row is read ``FOR UPDATE`` (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already
        serializes writers): a cancel in flight is waited for and seen, never overtaken.
        """
        if status not in (SUCCEEDED, FAILED):
            raise ValueError(f"a finished job is 'succeeded' or 'failed', not {status!r}")
        if status == SUCCEEDED and not checkpoint_path:
            raise ValueError("a succeeded job must name its checkpoint_path")
        now = self._clock()
        with self._write() as conn:
            run_status = conn.execute(sa.select(training_runs.c.status).where(training_runs.c.run_id == run_id)
                                      .with_for_update()).scalar_one_or_none()
            if status == SUCCEEDED and run_status == CANCELLED:
                status = DISCARDED
                error = "finished after its training run was cancelled: kept, never merged"
            result = conn.execute(
                training_jobs.update()
                .where(training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index)
                .values(status=status, checkpoint_path=checkpoint_path, adapter_sha256=sha256,
                        metrics=dict(metrics) if metrics is not None else None, error=error, finished_at=now,
                        base_model=base_model)
            )
            if result.rowcount != 1:
                raise KeyError(f"job {run_id}/{job_index} was never started")
            run_values: dict[str, Any] = {"updated_at": now}
            if status == SUCCEEDED:
                last = training_runs.c.last_finished_job
                run_values["last_finished_job"] = sa.case(
                    (last.is_(None), job_index), (last < job_index, job_index), else_=last)
            conn.execute(training_runs.update().where(training_runs.c.run_id == run_id).values(**run_values))
        job = self.get_job(run_id, job_index)
        assert job is not None
        return job

    def mark_job_failed(self, run_id: str, job_index: int, reason: str, *,
                        if_heartbeat_older_than_s: float | None = None) -> bool:
        """Compare-and-set a queued/running job to failed; False if it already finished.

        With ``if_heartbeat_older_than_s`` it only fails a job whose heartbeat is still stale at
        the moment of the update, so a watchdog cannot kill a job that just came back to life.
        """
        now = self._clock()
        cond = [training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index,
                training_jobs.c.status.in_([QUEUED, RUNNING])]
        if if_heartbeat_older_than_s is not None:
            cutoff = now - timedelta(seconds=if_heartbeat_older_than_s)
            cond.append(sa.or_(training_jobs.c.heartbeat_at.is_(None), training_jobs.c.heartbeat_at < cutoff))
        with self._write() as conn:
            result = conn.execute(training_jobs.update().where(*cond).values(status=FAILED, error=reason,
                                                                             finished_at=now))
        return result.rowcount == 1

    def discard_unclaimed(self, run_id: str, reason: str) -> int:
        """Keep a run's unclaimed adapters out of every candidate (a search's pruned and losing
        trials): ``succeeded`` → ``discarded`` with the reason; checkpoints stay on disk."""
        with self._write() as conn:
            return conn.execute(training_jobs.update().where(
                training_jobs.c.run_id == run_id, training_jobs.c.status == SUCCEEDED,
                training_jobs.c.candidate_id.is_(None)).values(status=DISCARDED, error=reason)).rowcount

    def complete_search(self, search_run_id: str, winner_run_id: str, reason: str) -> bool:
        """Complete a search and discard the other trials' unclaimed adapters in one transaction:
        trials become mergeable at the commit that discards the losers. False: it was not active."""
        runs = training_runs
        with self._write() as conn:
            won = conn.execute(runs.update().where(runs.c.run_id == search_run_id, runs.c.status == ACTIVE)
                               .values(status=COMPLETED, status_reason=reason, updated_at=self._clock()))
            if won.rowcount != 1:
                return False
            winner = conn.execute(sa.select(runs.c.trial_number).where(runs.c.run_id == winner_run_id)).scalar_one()
            losers = conn.execute(sa.select(runs.c.run_id, runs.c.trial_number).where(
                runs.c.parent_run_id == search_run_id, runs.c.run_id != winner_run_id)).all()
            for loser in losers:
                conn.execute(training_jobs.update().where(
                    training_jobs.c.run_id == loser.run_id, training_jobs.c.status == SUCCEEDED,
                    training_jobs.c.candidate_id.is_(None),
                ).values(status=DISCARDED, error=f"trial {loser.trial_number} lost the search to trial {winner}"))
        return True

    def get_job(self, run_id: str, job_index: int) -> TrainingJob | None:
        with self._read() as conn:
            row = conn.execute(sa.select(training_jobs).where(
                training_jobs.c.run_id == run_id, training_jobs.c.job_index == job_index)).mappings().first()
        return None if row is None else _job_from_row(row)

    def jobs_for_run(self, run_id: str) -> list[TrainingJob]:
        with self._read() as conn:
            rows = conn.execute(sa.select(training_jobs).where(training_jobs.c.run_id == run_id)
                                .order_by(training_jobs.c.job_index)).mappings()
            return [_job_from_row(r) for r in rows]

    def stale_jobs(self, heartbeat_older_than_s: float, *, worker_host: str | None = None) -> list[TrainingJob]:
        """Running jobs whose heartbeat is older than the given age: their worker probably died
        (a SIGKILLed run worker leaves its Dagster run STARTED forever under the default launcher).
        """
        cutoff = self._clock() - timedelta(seconds=heartbeat_older_than_s)
        query = sa.select(training_jobs).where(
            training_jobs.c.status == RUNNING,
            sa.or_(training_jobs.c.heartbeat_at.is_(None), training_jobs.c.heartbeat_at < cutoff))
        if worker_host is not None:
            query = query.where(training_jobs.c.worker_host == worker_host)
        with self._read() as conn:
            return [_job_from_row(r) for r in conn.execute(query.order_by(training_jobs.c.heartbeat_at)).mappings()]


def _run_from_row(row: Mapping[str, Any]) -> TrainingRun:
    return TrainingRun(
        run_id=row["run_id"], dialect=row["dialect"], dataset_version=row["dataset_version"],
        base_model_version=row["base_model_version"],
        # A corrupt row is read as it is: the chain refuses that run alone (validate_hparams).
        hparams=dict(row["hparams"]) if isinstance(row["hparams"], Mapping) else row["hparams"] or {},
        timebox_s=int(row["timebox_s"]), max_jobs=int(row["max_jobs"]), candidate_every=int(row["candidate_every"]),
        status=row["status"], status_reason=row["status_reason"], last_finished_job=row["last_finished_job"],
        created_at=row["created_at"], updated_at=row["updated_at"], init_from=row.get("init_from"),
        init_adapter=row.get("init_adapter"), generation=int(row.get("generation") or 0),
        kind=row.get("kind") or SINGLE, parallelism=int(row.get("parallelism") or 1),
        round_samples=int(row.get("round_samples") or 0),
        first_round_on_one_node=bool(row.get("first_round_on_one_node")), rehearsal_dataset=row.get("rehearsal_dataset"),
        parent_run_id=row.get("parent_run_id"), trial_number=row.get("trial_number"), spec=row.get("spec"),
        track=row.get("track") or ASR,
    )


def _job_from_row(row: Mapping[str, Any]) -> TrainingJob:
    names = TrainingJob.__dataclass_fields__
    return TrainingJob(**{k: row[k] for k in names if k in row})
