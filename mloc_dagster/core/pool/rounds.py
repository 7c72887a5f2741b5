"""Rounds of a distributed training run: which samples a round trains, where, and when it is done.

Pure decisions over the state store's records (no Dagster); the training-chain sensor acts on them.

- **Samples.** A distributed run trains one endless, seeded sample stream (``SampleStream``), the
  same order a single-node run would see. Round ``k`` trains ``round_samples`` positions of it:
  first the ranges of the previous round's *dropped* slices (late or failed: their samples go
  back into the next round), then fresh positions from where the previous rounds stopped.
- **Slices.** ``plan_slices`` maps a ``core.pool.placement`` placement (contiguous shard ranges over
  the round's samples, sized by node throughput) onto those stream ranges: one slice per node.
  Every slice starts from the previous round's merged adapter (round 0: the run's warm start or
  a fresh LoRA).
- **Stragglers.** The deadline counts *training* only: a slice that started training has until
  ``train_started_at + expected_s + STRAGGLER_GRACE_S`` (15 s) to end its last step, its expected
  time coming from the node's measured throughput. Once the other slices are in, a slice still
  training past that deadline is dropped from the round (its samples go into the next round, its
  node's throughput estimate drops to what it managed). A slice whose training ended
  (``train_ended_at``) is never late: its own evaluation and save are waited for. A slice still
  waiting for its node (Dagster's queue, the per-node limit, a shared device, its start-up) is
  waited for too: on real nodes the slices start together, so the round waits "the longest
  expected slice + 15 s". Liveness is the heartbeat's business, not the deadline's: the job beats
  from its start to its end (start-up and evaluation included), and a slice whose node stops
  heartbeating for ``silent_after_s`` is *replaced*: its samples are placed on another node as a
  new slice of the same round.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from mloc_dagster.core.pool.placement import Placement
from mloc_dagster.core.state.rounds import PlannedSlice, RoundSlice
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import DROPPED, FAILED, QUEUED, RUNNING, SUCCEEDED

STRAGGLER_GRACE_S = 15.0
_HASH = re.compile(r"^[0-9a-f]{64}$")


def base_model_hash(base_model_dir: str | Path) -> str:
    """The base model's content hash: its directory's name where the base_model asset wrote it,
    else computed (a model directory made by hand)."""
    name = Path(base_model_dir).name
    if _HASH.match(name):
        return name
    from mloc_dagster.core.publish import model_dir_hash

    return model_dir_hash(base_model_dir)


def first_round_alone(run: TrainingRun, k: int) -> bool:
    """Round ``k`` is the first round of a run that trains it on one node (post-local SGD: a round of
    P slices from a fresh LoRA is one step of a P×-larger batch and falls behind a single run,
    ``bench/pool_learning.py``): one slice, which keeps the run's learning-rate warm-up like a single
    run's first job. A pooled slice starts from a trained adapter and is a few steps, which a warm-up
    would take all of."""
    return k == 0 and run.first_round_on_one_node


def round_parallelism(run: TrainingRun, k: int) -> int:
    """How many slices round ``k`` is placed as, at most."""
    return 1 if first_round_alone(run, k) else run.parallelism


def round_segments(previous: Sequence[RoundSlice], round_samples: int) -> list[list[int]]:
    """The stream ranges round ``k`` trains, given round ``k-1``'s slices (empty for round 0)."""
    carried = [list(seg) for s in previous if s.status in (DROPPED, FAILED) for seg in s.segments]
    fresh_from = max((seg[1] for s in previous for seg in s.segments), default=0)
    fresh = max(0, round_samples - sum(b - a for a, b in carried))
    return carried + ([[fresh_from, fresh_from + fresh]] if fresh else [])


def split_segments(segments: Sequence[Sequence[int]], start: int, stop: int) -> list[list[int]]:
    """Positions ``start .. stop-1`` of the concatenation of ``segments``, as stream ranges."""
    out, offset = [], 0
    for a, b in segments:
        lo, hi = max(start, offset), min(stop, offset + (b - a))
        if lo < hi:
            out.append([a + lo - offset, a + hi - offset])
        offset += b - a
    return out


def plan_slices(segments: Sequence[Sequence[int]], placement: Placement, first_index: int = 0,
                replaces: int | None = None) -> list[PlannedSlice]:
    """One slice per placed shard, numbered from ``first_index``."""
    return [PlannedSlice(first_index + k, shard.node_id, split_segments(segments, shard.start, shard.stop),
                         shard.expected_s, replaces)
            for k, shard in enumerate(placement.shards)]


@dataclass(frozen=True)
class RoundState:
    """Where a round stands: ``ready`` to merge (nothing in flight, or the deadline passed, in
    which case ``late`` lists the slices to drop), and the deadline if one is known."""

    ready: bool
    deadline: datetime | None
    late: tuple[RoundSlice, ...] = ()
    succeeded: int = 0


def slice_deadline(s: RoundSlice, grace_s: float = STRAGGLER_GRACE_S) -> datetime | None:
    """When a slice that started training is late: its expected time + the grace after its first step."""
    if s.train_started_at is None:
        return None
    return s.train_started_at + timedelta(seconds=s.expected_s + grace_s)


def is_late(s: RoundSlice, now: datetime, grace_s: float = STRAGGLER_GRACE_S) -> bool:
    """In flight, still training, and past its deadline. Start-up (no first step yet) and the
    slice's own evaluation and save (training ended) never make it late."""
    deadline = slice_deadline(s, grace_s)
    return s.in_flight and s.train_ended_at is None and deadline is not None and now > deadline


def round_state(slices: Sequence[RoundSlice], now: datetime, grace_s: float = STRAGGLER_GRACE_S) -> RoundState:
    """A slice still waiting for its node (Dagster's queue, the per-node limit, the device, its
    start-up) or finishing (evaluation, save) is waited for; one still training is late once past
    ``slice_deadline``. The round is ready when every slice is in or late, and at least one is in."""
    deadlines = [d for s in slices if (d := slice_deadline(s, grace_s)) is not None]
    in_flight = [s for s in slices if s.status in (QUEUED, RUNNING)]
    late = [s for s in in_flight if is_late(s, now, grace_s)]
    succeeded = sum(s.status == SUCCEEDED for s in slices)
    deadline = max(deadlines, default=None)
    if not in_flight:
        return RoundState(True, deadline, (), succeeded)
    if len(late) == len(in_flight) and succeeded:
        return RoundState(True, deadline, tuple(late), succeeded)
    return RoundState(False, deadline, (), succeeded)


def observed_throughput(s: RoundSlice, now: datetime) -> float | None:
    """What a late slice managed (samples/s since its first step), from its last heartbeat's progress."""
    if s.train_started_at is None or not s.progress:
        return None
    seconds = (now - s.train_started_at).total_seconds()
    samples = float(s.progress.get("samples") or 0)
    return samples / seconds if seconds > 0 and samples > 0 else None
