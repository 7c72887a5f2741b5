"""The distributed half of the training chain: one round of a distributed run at a time.

Every tick, for an active distributed run, the round after the last merged one:

1. not placed yet: place it on the pool (``core.pool.rounds``; available nodes from the registry,
   throughput-proportional ranges, a day's quota taken from every node that gets a slice) and
   request one run of the training job per slice. No node available: the run pauses with the
   reason (register or calibrate nodes, then resume).
2. placed: a slice whose node stopped heartbeating (the job beats from its start to its end,
   start-up and evaluation included), or on a Ray pool one still waiting to start on a node Ray
   no longer has alive, is re-placed on another node; when every slice is in, or
   the round's deadline (longest expected slice + 15 s, counting training only) passed, the
   slices still training are dropped (their node's throughput estimate drops to what they
   managed) and the round merge is requested. A round in which no slice succeeded fails the run.

A canceled slice goes back to ``queued`` and pauses the run (``handle_ended_slice``); after
``mloc run resume`` it is requested again, like a canceled round merge, under the next
generation's run key -- unless a Dagster run of it is still queued or running, which then trains
it. So a round whose slices were all canceled is placed again, never failed.

Run keys (``<run_id>/<round>/<slice>``, ``<run_id>/<round>/merge``, ``/g<N>`` after the N-th
resume) make every repeated decision harmless; Dagster's queue, per-node concurrency and retries
do the rest.
"""

import os
from dataclasses import replace
from datetime import UTC, datetime

import dagster as dg

from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.pool.assign import place_on_pool, waiting_on_gone_nodes
from mloc_dagster.core.pool.placement import PlacementError
from mloc_dagster.core.pool.rounds import (
    base_model_hash,
    observed_throughput,
    plan_slices,
    round_parallelism,
    round_segments,
    round_state,
)
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.rounds import RoundSlice
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, DROPPED, FAILED, PAUSED, QUEUED, REPLACED, RUNNING
from mloc_dagster.runs.requests import round_merge_request, slice_run_request
from mloc_dagster.runs.service import IN_FLIGHT
from mloc_dagster.runs.verdicts import will_retry

SILENT_AFTER_S = float(os.environ.get("MLOC_SLICE_SILENT_S", "60"))


def round_requests(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun) -> list[dg.RunRequest]:
    k = (-1 if run.last_finished_job is None else run.last_finished_job) + 1
    if k >= run.max_jobs or run.status != ACTIVE:
        return []
    if not (store.round_slices(run.run_id, k) or place_round(context, store, run, k)):
        return []
    replace_gone(context, store, run, k)  # first: a slice whose node is gone is not requested again
    queued = [s for s in store.round_slices(run.run_id, k) if s.status == QUEUED]
    running = slices_in_flight(context.instance, run, k) if queued else set()
    requests = [slice_run_request(run, s) for s in queued if s.slice_index not in running]
    now = datetime.now(UTC)
    state = round_state([still_trying(context.instance, s) for s in store.round_slices(run.run_id, k)], now)
    if not state.ready:
        return requests
    if state.succeeded == 0:
        reasons = "; ".join(f"slice {s.slice_index} on {s.node_id}: {s.error or s.outcome or s.status}"
                            for s in store.round_slices(run.run_id, k))
        store.transition_run(run.run_id, ACTIVE, FAILED, f"round {k}: no slice succeeded ({reasons})"[:2000])
        return []
    for s in state.late:
        drop_late(context, store, run, s, state.deadline, now)
    return [*requests, round_merge_request(run, k)]


def place_round(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun,
                k: int) -> list[RoundSlice]:
    segments = round_segments(store.round_slices(run.run_id, k - 1) if k > 0 else [], run.round_samples)
    try:
        placement = place_on_pool(store, run, sum(b - a for a, b in segments), parallelism=round_parallelism(run, k))
    except PlacementError as exc:
        reason = (f"round {k} cannot be placed: {exc}. Register or calibrate nodes (`mloc node list`, "
                  f"`mloc node calibrate`), then `mloc run resume {run.run_id}`")
        if store.transition_run(run.run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run.run_id} paused: {reason}")
        return []
    for warning in placement.warnings:
        context.log.warning(f"round {k} of {run.run_id}: {warning}")
    context.log.info(f"round {k} of {run.run_id} placed: " + ", ".join(
        f"{s.node_id} {s.samples} samples ~{s.expected_s:.0f} s" for s in placement.shards))
    return store.place_slices(run.run_id, k, plan_slices(segments, placement))


def replace_gone(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun, k: int) -> None:
    """Slices whose node went away, placed again on another node as new slices of the round (queued,
    requested with the others): a running slice whose node went silent, and on a Ray pool a slice
    still waiting to start on a node Ray no longer has alive, whose waiting Dagster run is canceled."""
    silent = [(s, f"node {s.node_id} silent for > {SILENT_AFTER_S:.0f} s")
              for s in store.silent_slices(run.run_id, k, SILENT_AFTER_S)]
    for s, why in silent + waiting_on_gone_nodes(store.round_slices(run.run_id, k)):
        try:
            placement = place_on_pool(store, run, s.samples, parallelism=1, exclude={s.node_id})
        except PlacementError as exc:
            context.log.warning(f"round {k} slice {s.slice_index}: {why} and {exc}")
            continue
        if not store.end_slice(run.run_id, k, s.slice_index, REPLACED,
                               f"{why}: re-placed on {placement.shards[0].node_id}"):
            store.release_job_quota(placement.shards[0].node_id)  # it finished meanwhile: no new slice
            continue
        first = 1 + max(x.slice_index for x in store.round_slices(run.run_id, k))
        store.place_slices(run.run_id, k, plan_slices(s.segments, placement, first, replaces=s.slice_index))
        context.log.warning(f"round {k} slice {s.slice_index}: {why}, re-placed")
        if s.status == QUEUED:
            cancel_waiting_runs(context, run, k, s.slice_index)


def cancel_waiting_runs(context: dg.SensorEvaluationContext, run: TrainingRun, k: int, index: int) -> None:
    """Dagster's cancel for the runs still waiting to train a slice placed again elsewhere: a queued
    run ends, a launched one's Ray job is stopped; the ended run finds its slice replaced
    (``handle_ended_slice``) and pauses nothing. A cancel that fails is logged: such a run, if it
    ever starts, finds its slice replaced and does not train."""
    instance = context.instance
    for record in instance.get_run_records(dg.RunsFilter(job_name=TRAIN_JOB, statuses=IN_FLIGHT, tags={
            "mloc/run_id": run.run_id, "mloc/round": str(k), "mloc/slice": str(index)})):
        try:
            instance.run_coordinator.cancel_run(record.dagster_run.run_id)
        except Exception as exc:  # noqa: BLE001 -- the replacement stands either way
            context.log.warning(f"round {k} slice {index}: canceling Dagster run {record.dagster_run.run_id} "
                                f"failed: {exc}")


def slices_in_flight(instance: dg.DagsterInstance, run: TrainingRun, k: int) -> set[int]:
    """Slices of round ``k`` with a Dagster run queued or running (one bounded query): after a
    resume that run trains the slice, a new request would train it twice."""
    records = instance.get_run_records(dg.RunsFilter(
        job_name=TRAIN_JOB, statuses=IN_FLIGHT, tags={"mloc/run_id": run.run_id, "mloc/round": str(k)}))
    return {int(r.dagster_run.tags["mloc/slice"]) for r in records if "mloc/slice" in r.dagster_run.tags}


def still_trying(instance: dg.DagsterInstance, s: RoundSlice) -> RoundSlice:
    """A failed slice whose Dagster run will be retried is still in flight."""
    if s.status != FAILED or not s.dagster_run_id:
        return s
    dagster_run = instance.get_run_by_id(s.dagster_run_id)
    return replace(s, status=RUNNING) if dagster_run is not None and will_retry(instance, dagster_run) else s


def drop_late(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun, s: RoundSlice,
              deadline: datetime | None, now: datetime) -> None:
    """Merge without it (its samples go into the next round); its node is slower than we thought."""
    if not store.end_slice(run.run_id, s.round_index, s.slice_index, DROPPED,
                           f"late: still training at the round's deadline {deadline:%H:%M:%S} "
                           f"(expected {s.expected_s:.0f} s)", still_training=True):
        return
    base = base_model_hash(run.base_model_version)
    record = store.find_node(s.node_id)
    known = record.samples_per_s(base) if record is not None else None
    seen = observed_throughput(s, now) or (known / 4 if known else None)
    if seen:
        store.record_job_throughput(s.node_id, base, seen, seen_at=s.heartbeat_at or s.started_at)
    context.log.warning(f"round {s.round_index} slice {s.slice_index} on {s.node_id} dropped as late; "
                        f"throughput estimate now from {seen or 'nothing'} samples/s")
