"""Distributed rounds: which samples a round trains, slices in the state store, stragglers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mloc_dagster.core.pool.placement import NodeSpeed, place
from mloc_dagster.core.pool.rounds import is_late, plan_slices, round_segments, round_state, split_segments
from mloc_dagster.core.state.rounds import PlannedSlice
from mloc_dagster.core.state.schema import DROPPED, FAILED, QUEUED, REPLACED, RUNNING, SUCCEEDED


def _run(store):
    return store.create_run(dialect="sco", dataset_version="d", base_model_version="b", kind="distributed",
                            parallelism=3, round_samples=90, max_jobs=3)


def test_a_distributed_run_needs_a_sane_round(store):
    with pytest.raises(ValueError, match="round_samples >= parallelism"):
        store.create_run(dialect="sco", dataset_version="d", base_model_version="b", kind="distributed",
                         parallelism=4, round_samples=2)
    with pytest.raises(ValueError, match="run kind 'federated'"):
        store.create_run(dialect="sco", dataset_version="d", base_model_version="b", kind="federated")
    assert _run(store).distributed and not store.create_run(dialect="sco", dataset_version="d",
                                                            base_model_version="b").distributed


def test_placed_shards_map_onto_stream_ranges_and_dropped_samples_come_back():
    nodes = [NodeSpeed("a", 1.0), NodeSpeed("b", 2.0), NodeSpeed("c", 3.0)]
    first = round_segments([], 60)
    assert first == [[0, 60]]
    planned = plan_slices(first, place(nodes, 60))
    assert [p.segments for p in planned] == [[[0, 10]], [[10, 30]], [[30, 60]]]
    assert [p.node_id for p in planned] == ["a", "b", "c"]
    # Round 1: slice "b" was dropped (late): its 20 samples first, then 40 fresh from 60.
    slices = [_slice(p, SUCCEEDED if p.node_id != "b" else DROPPED) for p in planned]
    second = round_segments(slices, 60)
    assert second == [[10, 30], [60, 100]]
    assert split_segments(second, 15, 30) == [[25, 30], [60, 70]]
    assert sum(b - a for p in plan_slices(second, place(nodes, 60)) for a, b in p.segments) == 60


def _slice(p: PlannedSlice, status: str, **kw):
    from mloc_dagster.core.state.rounds import RoundSlice

    fields = {f: None for f in RoundSlice.__dataclass_fields__}
    fields.update(run_id="r", round_index=0, slice_index=p.slice_index, node_id=p.node_id, segments=p.segments,
                  samples=sum(b - a for a, b in p.segments), expected_s=p.expected_s, status=status, attempts=1)
    return replace(RoundSlice(**fields), **kw)


def test_slices_live_in_the_store_and_a_round_waits_for_stragglers_only_so_long(store, clock):
    run = _run(store)
    planned = [PlannedSlice(0, "a", [[0, 30]], 30.0), PlannedSlice(1, "b", [[30, 90]], 30.0)]
    assert [s.status for s in store.place_slices(run.run_id, 0, planned)] == [QUEUED, QUEUED]
    # A repeated placement (a sensor tick after a crash) changes nothing.
    again = store.place_slices(run.run_id, 0, [PlannedSlice(0, "z", [[0, 90]], 1.0)])
    assert [s.node_id for s in again] == ["a", "b"] and again[1].samples == 60

    assert store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d0")
    assert store.record_slice_started(run.run_id, 0, 1, dagster_run_id="d1")
    assert not round_state(store.round_slices(run.run_id, 0), clock()).ready
    store.slice_training_started(run.run_id, 0, 0)
    store.slice_training_started(run.run_id, 0, 1)
    clock.advance(31)
    store.record_slice_finished(run.run_id, 0, 0, SUCCEEDED, checkpoint_path="/a", sha256="x")
    state = round_state(store.round_slices(run.run_id, 0), clock())
    assert not state.ready and state.deadline is not None
    clock.advance(15)  # the deadline: the longest expected slice (30 s) + 15 s grace
    state = round_state(store.round_slices(run.run_id, 0), clock())
    assert state.ready and [s.slice_index for s in state.late] == [1]
    assert store.end_slice(run.run_id, 0, 1, DROPPED, "late")
    assert not store.heartbeat_slice(run.run_id, 0, 1, {"samples": 40})  # the worker stops
    # It finishes anyway: checkpoint recorded, still dropped (never merged).
    late = store.record_slice_finished(run.run_id, 0, 1, SUCCEEDED, checkpoint_path="/b", sha256="y")
    assert (late.status, late.checkpoint_path, late.outcome) == (DROPPED, "/b", "late")
    assert not store.record_slice_started(run.run_id, 0, 1, dagster_run_id="d1-retry")


def test_a_silent_slice_is_found_and_can_be_replaced(store, clock):
    run = _run(store)
    store.place_slices(run.run_id, 0, [PlannedSlice(0, "a", [[0, 90]], 60.0)])
    store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d0")
    clock.advance(20)
    assert store.heartbeat_slice(run.run_id, 0, 0, {"samples": 10})
    assert store.silent_slices(run.run_id, 0, 60) == []
    clock.advance(61)
    assert [s.slice_index for s in store.silent_slices(run.run_id, 0, 60)] == [0]
    assert store.end_slice(run.run_id, 0, 0, REPLACED, "node silent")
    store.place_slices(run.run_id, 0, [PlannedSlice(1, "b", [[0, 90]], 60.0, replaces=0)])
    assert [(s.status, s.replaces) for s in store.round_slices(run.run_id, 0)] == [(REPLACED, None), (QUEUED, 0)]
    # A failed slice is not in flight; nothing in flight and nothing succeeded: ready, 0 succeeded.
    store.record_slice_started(run.run_id, 0, 1, dagster_run_id="d1")
    store.record_slice_finished(run.run_id, 0, 1, FAILED, error="boom")
    state = round_state(store.round_slices(run.run_id, 0), clock())
    assert state.ready and state.succeeded == 0
    assert RUNNING not in {s.status for s in store.round_slices(run.run_id, 0)}
    with pytest.raises(ValueError, match="'dropped' or 'replaced'"):
        store.end_slice(run.run_id, 0, 1, SUCCEEDED, "no")


def test_the_deadline_counts_training_only_a_slow_start_and_a_long_evaluation_are_waited_for(store, clock):
    run = _run(store)
    planned = [PlannedSlice(0, "a", [[0, 30]], 30.0), PlannedSlice(1, "b", [[30, 60]], 30.0),
               PlannedSlice(2, "c", [[60, 90]], 30.0)]
    store.place_slices(run.run_id, 0, planned)
    for i in range(3):
        store.record_slice_started(run.run_id, 0, i, dagster_run_id=f"d{i}")
    store.slice_training_started(run.run_id, 0, 0)
    store.slice_training_started(run.run_id, 0, 1)  # "c" is still loading its model: no first step
    clock.advance(30)
    store.slice_training_ended(run.run_id, 0, 1)  # "b" trained in time, now evaluates and saves
    store.record_slice_finished(run.run_id, 0, 0, SUCCEEDED, checkpoint_path="/a", sha256="x")
    clock.advance(300)  # far past every deadline (30 s + 15 s): "b" evaluates, "c" starts slowly
    slices = store.round_slices(run.run_id, 0)
    state = round_state(slices, clock())
    assert not state.ready and state.late == ()
    assert not is_late(slices[1], clock()) and not is_late(slices[2], clock())
    # Even a sensor that read "b" as still training a moment ago cannot drop it now.
    assert not store.end_slice(run.run_id, 0, 1, DROPPED, "late", still_training=True)
    # Once "c" trains, its own deadline counts from its first step.
    store.slice_training_started(run.run_id, 0, 2)
    clock.advance(46)
    slices = store.round_slices(run.run_id, 0)
    assert is_late(slices[2], clock()) and not is_late(slices[1], clock())
    store.record_slice_finished(run.run_id, 0, 1, SUCCEEDED, checkpoint_path="/b", sha256="y")
    state = round_state(store.round_slices(run.run_id, 0), clock())
    assert state.ready and [s.slice_index for s in state.late] == [2]
    assert store.end_slice(run.run_id, 0, 2, DROPPED, "late", still_training=True)


def test_a_canceled_slice_goes_back_to_queued_unless_it_ended_first(store, clock):
    run = _run(store)
    store.place_slices(run.run_id, 0, [PlannedSlice(0, "a", [[0, 45]], 30.0), PlannedSlice(1, "b", [[45, 90]], 30.0)])
    for i in (0, 1):
        store.record_slice_started(run.run_id, 0, i, dagster_run_id=f"d{i}")
    store.slice_training_started(run.run_id, 0, 0)
    assert not store.requeue_slice(run.run_id, 0, 0, "an older run canceled", dagster_run_id="d-old")  # d0 trains it
    assert store.get_slice(run.run_id, 0, 0).status == RUNNING
    assert store.requeue_slice(run.run_id, 0, 0, "Dagster run d0 canceled", dagster_run_id="d0")
    again = store.get_slice(run.run_id, 0, 0)
    assert (again.status, again.train_started_at, again.outcome) == (QUEUED, None, "Dagster run d0 canceled")
    assert not round_state(store.round_slices(run.run_id, 0), clock()).ready  # waited for, never failed
    store.record_slice_finished(run.run_id, 0, 1, SUCCEEDED, checkpoint_path="/b", sha256="y")
    assert not store.requeue_slice(run.run_id, 0, 1, "canceled too late", dagster_run_id="d1")  # it succeeded first
    assert store.get_slice(run.run_id, 0, 1).status == SUCCEEDED
    assert store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d0-again")  # the resumed request trains it


def test_a_first_round_on_one_node_is_one_slice_that_warms_up_and_the_rounds_after_pool():
    from types import SimpleNamespace

    from mloc_dagster.core.pool.rounds import first_round_alone, round_parallelism

    post_local, pooled = (SimpleNamespace(parallelism=4, first_round_on_one_node=flag) for flag in (True, False))
    assert [round_parallelism(post_local, k) for k in range(3)] == [1, 4, 4]
    assert [first_round_alone(post_local, k) for k in range(3)] == [True, False, False]
    assert [round_parallelism(pooled, k) for k in range(2)] == [4, 4]
    assert not any(first_round_alone(pooled, k) for k in range(2))  # pooled slices never warm up
