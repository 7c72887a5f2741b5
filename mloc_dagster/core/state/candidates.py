"""Candidates (merged adapters), the adapters they claimed, and promotions per dialect and branch.

An adapter belongs to at most one candidate. A merge reads the unclaimed adapters, merges them
outside any transaction, then claims exactly the adapters it merged and inserts the candidate in
one transaction (``record_candidate``); if another merge claimed one of them meanwhile, nothing is
written and ``AdapterClaimConflict`` says which, so the caller merges again without it. No adapter
is ever in two candidates, and none is lost to a merge that failed half-way.

A candidate whose gate never spoke (its job failed or was canceled after the merge) gives its
adapters back (``release_claims``): they go into the next candidate, and the candidate is kept,
marked ``released``, so nothing gates or promotes it any more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mloc_dagster.core.state.engine import StoreEngine, new_id
from mloc_dagster.core.state.schema import (
    ADAPTER_BRANCHES,
    ASR,
    COMPLETED,
    SUCCEEDED,
    candidates,
    promotions,
    training_jobs,
    training_runs,
)

RELEASED = "released"  # gate_decision of a candidate whose gate never spoke: its claims went back


class AdapterClaimConflict(RuntimeError):
    """Another candidate claimed some of the adapters meanwhile; merge again without them."""

    def __init__(self, taken: Sequence[str]):
        super().__init__(f"adapters already claimed by another candidate: {', '.join(taken)}")
        self.taken = list(taken)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One adapter that can go into (or went into) a candidate."""

    run_id: str
    job_index: int
    node_id: str | None
    sha256: str | None
    path: str
    base_model: str | None = None  # hash of the base model it was trained on

    @property
    def key(self) -> str:
        return f"{self.run_id}/{self.job_index}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterRef:
        return cls(run_id=str(d["run_id"]), job_index=int(d["job_index"]), node_id=d.get("node_id"),
                   sha256=d.get("sha256"), path=str(d["path"]), base_model=d.get("base_model"))


@dataclass(frozen=True, slots=True)
class Candidate:
    candidate_id: str
    dialect: str
    created_at: datetime
    adapter_path: str
    sha256: str
    sources: tuple[AdapterRef, ...]
    trusted: bool
    gate_decision: str | None  # None until the gate ran, then "passed" | "failed"; or RELEASED
    gate_report_path: str | None
    details: dict[str, Any] | None  # merge summary: method, truncation errors, clipped/rejected
    base_model: str | None = None  # hash; the candidate is gated and served on this base only
    base_model_path: str | None = None
    dataset_version: str | None = None  # whose test split the gate evaluates
    dagster_run_id: str | None = None  # the (root) Dagster run that merged it
    training_run_id: str | None = None  # the training run whose chain asked for it, if any
    track: str = ASR  # asr | tts: which model it adapts


@dataclass(frozen=True, slots=True)
class Promotion:
    promotion_id: int
    dialect: str
    branch: str
    candidate_id: str
    promoted_at: datetime
    adapter_path: str
    sha256: str
    base_model: str | None = None
    track: str = ASR


def newest_per_run(refs: Sequence[AdapterRef]) -> list[AdapterRef]:
    """Each run's newest checkpoint: the jobs of one run resume from each other, so its last
    checkpoint already contains the earlier ones."""
    newest: dict[str, AdapterRef] = {}
    for ref in refs:
        if ref.run_id not in newest or ref.job_index > newest[ref.run_id].job_index:
            newest[ref.run_id] = ref
    return [r for r in refs if newest[r.run_id] is r]


class CandidateStore(StoreEngine):
    def unclaimed_adapters(self, dialect: str, *, base_model: str | None = None,
                           latest_per_run: bool = False, track: str = ASR) -> list[AdapterRef]:
        """Succeeded job checkpoints of ``dialect``'s ``track`` runs (all runs, all nodes) no
        candidate claimed yet, oldest first; only those trained on ``base_model`` when it is given.

        "Since the last candidate" is tracked by claims rather than by timestamps, so an adapter
        finishing while a merge is running is neither lost nor merged twice, whatever the clocks say.
        A hyperparameter search's trials are held back until the search completed (its losing
        trials are discarded in the same transaction, ``complete_search``): no candidate merges a
        trial that is still being judged, nor a loser; a trial run that did not complete (pruned,
        failed) never contributes, even with a job that succeeded late.
        """
        search = training_runs.alias("search")
        query = (
            sa.select(training_jobs.c.run_id, training_jobs.c.job_index, training_jobs.c.node_id,
                      training_jobs.c.adapter_sha256, training_jobs.c.checkpoint_path, training_jobs.c.base_model)
            .join(training_runs, training_runs.c.run_id == training_jobs.c.run_id)
            .outerjoin(search, search.c.run_id == training_runs.c.parent_run_id)
            .where(sa.or_(training_runs.c.trial_number.is_(None),
                          sa.and_(search.c.status == COMPLETED, training_runs.c.status == COMPLETED)))
            .where(sa.func.coalesce(training_runs.c.track, ASR) == track)
            .where(training_runs.c.dialect == dialect, training_jobs.c.status == SUCCEEDED,
                   training_jobs.c.candidate_id.is_(None), training_jobs.c.checkpoint_path.is_not(None))
            .order_by(training_jobs.c.finished_at, training_jobs.c.run_id, training_jobs.c.job_index)
        )
        if base_model is not None:
            query = query.where(training_jobs.c.base_model == base_model)
        with self._read() as conn:
            refs = [AdapterRef(run_id=r.run_id, job_index=r.job_index, node_id=r.node_id, sha256=r.adapter_sha256,
                               path=r.checkpoint_path, base_model=r.base_model) for r in conn.execute(query)]
        return newest_per_run(refs) if latest_per_run else refs

    def record_candidate(self, *, dialect: str, adapter_path: str, sha256: str, sources: Sequence[AdapterRef],
                         trusted: bool, details: Mapping[str, Any] | None = None, candidate_id: str | None = None,
                         base_model: str | None = None, base_model_path: str | None = None,
                         dataset_version: str | None = None, dagster_run_id: str | None = None,
                         training_run_id: str | None = None, claim: Sequence[AdapterRef] | None = None,
                         track: str = ASR) -> Candidate:
        """Store a merged candidate and claim its sources, in one transaction.

        Claimed are the listed sources (or only ``claim``, a subset of them: an experimental
        candidate lists the trusted adapters it merged, which the stable candidate claimed) and,
        for each run among them, that run's earlier succeeded jobs (ancestors of the listed
        checkpoint, see ``newest_per_run``). Raises ``AdapterClaimConflict`` (and writes nothing)
        if an adapter to claim is claimed already.
        """
        keys = {s.key for s in sources}
        claim = list(sources) if claim is None else list(claim)
        if stray := sorted(c.key for c in claim if c.key not in keys):
            raise ValueError(f"adapters to claim must be among the sources: {stray}")
        values = {
            "candidate_id": candidate_id or new_id("cand"), "dialect": dialect, "created_at": self._clock(),
            "adapter_path": adapter_path, "sha256": sha256, "sources": [s.to_dict() for s in sources],
            "trusted": bool(trusted), "gate_decision": None, "gate_report_path": None,
            "details": dict(details) if details is not None else None, "base_model": base_model,
            "base_model_path": base_model_path, "dataset_version": dataset_version,
            "dagster_run_id": dagster_run_id, "training_run_id": training_run_id, "track": track,
        }
        cid = values["candidate_id"]
        with self._write() as conn:
            taken = []
            for s in claim:
                claimed = conn.execute(training_jobs.update().where(
                    training_jobs.c.run_id == s.run_id, training_jobs.c.job_index == s.job_index,
                    training_jobs.c.status == SUCCEEDED, training_jobs.c.candidate_id.is_(None),
                ).values(candidate_id=cid))
                if claimed.rowcount != 1:
                    taken.append(s.key)
            if taken:
                raise AdapterClaimConflict(taken)  # rolls the transaction back: nothing was claimed
            for s in newest_per_run(claim):
                conn.execute(training_jobs.update().where(
                    training_jobs.c.run_id == s.run_id, training_jobs.c.job_index < s.job_index,
                    training_jobs.c.status == SUCCEEDED, training_jobs.c.candidate_id.is_(None),
                ).values(candidate_id=cid))
            conn.execute(candidates.insert().values(**values))
        return _candidate_from_row(values)

    def set_gate_result(self, candidate_id: str, decision: str, report_path: str | None) -> Candidate:
        """Record the gate's decision; refused for a released candidate (its adapters may be in
        another candidate by now)."""
        if decision not in ("passed", "failed"):
            raise ValueError(f"gate decision is 'passed' or 'failed', not {decision!r}")
        with self._write() as conn:
            result = conn.execute(candidates.update().where(
                candidates.c.candidate_id == candidate_id,
                sa.func.coalesce(candidates.c.gate_decision, "") != RELEASED,
            ).values(gate_decision=decision, gate_report_path=report_path))
        if result.rowcount != 1:
            if self.get_candidate(candidate_id) is None:
                raise KeyError(f"unknown candidate {candidate_id}")
            raise ValueError(f"candidate {candidate_id} was released (its gate never spoke; its adapters went "
                             "back to the next candidate): it is never gated")
        cand = self.get_candidate(candidate_id)
        assert cand is not None
        return cand

    def release_claims(self, candidate_id: str, reason: str) -> int | None:
        """A candidate whose gate never spoke gives its adapters back, in one transaction: it is
        marked ``released`` (the reason in ``details.released``) and its claimed adapters are
        unclaimed, so the next candidate merges them. Returns how many adapters went back, or None
        if the gate had already decided (nothing changed)."""
        with self._write() as conn:
            row = conn.execute(sa.select(candidates.c.details).where(
                candidates.c.candidate_id == candidate_id, candidates.c.gate_decision.is_(None))).first()
            if row is None:
                return None
            conn.execute(candidates.update().where(candidates.c.candidate_id == candidate_id).values(
                gate_decision=RELEASED, details={**(row.details or {}), "released": reason}))
            return conn.execute(training_jobs.update().where(training_jobs.c.candidate_id == candidate_id)
                                .values(candidate_id=None)).rowcount

    def get_candidate(self, candidate_id: str) -> Candidate | None:
        return self._one_candidate(candidates.c.candidate_id == candidate_id)

    def candidate_of_dagster_run(self, dagster_run_id: str) -> Candidate | None:
        """The candidate merged by this (root) Dagster run: what its gate and promotion act on."""
        return self._one_candidate(candidates.c.dagster_run_id == dagster_run_id)

    def _one_candidate(self, where: Any) -> Candidate | None:
        with self._read() as conn:
            row = conn.execute(sa.select(candidates).where(where)).mappings().first()
        return None if row is None else _candidate_from_row(row)

    def list_candidates(self, dialect: str | None = None, limit: int | None = 20, *,
                        training_run_id: str | None = None) -> list[Candidate]:
        """Newest first; every dialect when ``dialect`` is None; only those a training run's
        chain asked for when ``training_run_id`` is given."""
        query = sa.select(candidates).order_by(candidates.c.created_at.desc(), candidates.c.candidate_id.desc())
        if training_run_id is not None:
            query = query.where(candidates.c.training_run_id == training_run_id)
        if dialect is not None:
            query = query.where(candidates.c.dialect == dialect)
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
        if cand.gate_decision != "passed":
            raise ValueError(f"candidate {candidate_id} has not passed its gate ({cand.gate_decision or 'not gated'})")
        now = self._clock()
        with self._write() as conn:
            result = conn.execute(promotions.insert().values(dialect=dialect, branch=branch,
                                                             candidate_id=candidate_id, promoted_at=now))
            (promotion_id,) = result.inserted_primary_key
        return Promotion(int(promotion_id), dialect, branch, candidate_id, now, cand.adapter_path, cand.sha256,
                         cand.base_model, cand.track)

    def production(self, dialect: str, branch: str = "stable", track: str = ASR) -> Promotion | None:
        """What currently serves ``dialect``'s ``track`` on ``branch``: the latest promotion, or None."""
        found = self.list_promotions(dialect, branch=branch, limit=1, track=track)
        return found[0] if found else None

    def list_promotions(self, dialect: str | None = None, branch: str | None = None,
                        limit: int | None = 20, track: str | None = None) -> list[Promotion]:
        """Newest first; every track when ``track`` is None."""
        track_of = sa.func.coalesce(candidates.c.track, ASR)
        query = (
            sa.select(promotions, candidates.c.adapter_path, candidates.c.sha256, candidates.c.base_model,
                      track_of.label("track"))
            .join(candidates, candidates.c.candidate_id == promotions.c.candidate_id)
            # promotion_id, not promoted_at: two promotions within one clock tick stay ordered.
            .order_by(promotions.c.promotion_id.desc())
        )
        if dialect is not None:
            query = query.where(promotions.c.dialect == dialect)
        if branch is not None:
            query = query.where(promotions.c.branch == branch)
        if track is not None:
            query = query.where(track_of == track)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [Promotion(r.promotion_id, r.dialect, r.branch, r.candidate_id, r.promoted_at, r.adapter_path,
                              r.sha256, r.base_model, r.track) for r in conn.execute(query)]


def _candidate_from_row(row: Mapping[str, Any]) -> Candidate:
    return Candidate(
        candidate_id=row["candidate_id"], dialect=row["dialect"], created_at=row["created_at"],
        adapter_path=row["adapter_path"], sha256=row["sha256"],
        sources=tuple(AdapterRef.from_dict(s) for s in (row["sources"] or [])), trusted=bool(row["trusted"]),
        gate_decision=row["gate_decision"], gate_report_path=row["gate_report_path"], details=row["details"],
        base_model=row.get("base_model"), base_model_path=row.get("base_model_path"),
        dataset_version=row.get("dataset_version"), dagster_run_id=row.get("dagster_run_id"),
        training_run_id=row.get("training_run_id"), track=row.get("track") or ASR,
    )
