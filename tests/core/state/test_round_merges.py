"""What a round merge records (the nodes inside its adapter, reputation moves once per round) and
the quota a slice that never started gives back; on SQLite and on real PostgreSQL (``store``)."""

from __future__ import annotations

import pytest

from mloc_dagster.core.pool.reputation import ReputationUpdate
from mloc_dagster.core.state.candidates import AdapterRef
from mloc_dagster.core.state.rounds import PlannedSlice
from mloc_dagster.core.state.schema import DROPPED, FAILED


def _run(store):
    return store.create_run(dialect="sco", dataset_version="d", base_model_version="b", kind="distributed",
                            parallelism=2, round_samples=90, max_jobs=3)


def test_a_slice_that_never_started_gives_its_quota_back_once(store, clock):
    run = _run(store)
    assert store.take_job_quota("a", 5) and store.take_job_quota("b", 5)
    store.place_slices(run.run_id, 0, [PlannedSlice(0, "a", [[0, 45]], 9.0), PlannedSlice(1, "b", [[45, 90]], 9.0)])
    store.record_slice_started(run.run_id, 0, 1, dagster_run_id="d1")
    store.record_slice_finished(run.run_id, 0, 1, FAILED, error="boom")
    today = clock().date().isoformat()
    # Its Dagster run was canceled in the queue: the slice never started, the job is given back...
    assert store.end_slice(run.run_id, 0, 0, DROPPED, "Dagster run canceled")
    assert store.get_node("a").jobs_taken(today) == 0
    assert not store.end_slice(run.run_id, 0, 0, DROPPED, "again")  # ...once
    assert store.get_node("a").jobs_taken(today) == 0
    # A slice that started used its job, whatever became of it.
    assert store.end_slice(run.run_id, 0, 1, DROPPED, "failed: boom")
    assert store.get_node("b").jobs_taken(today) == 1
    assert [s.status for s in store.round_slices(run.run_id, 0)] == [DROPPED, DROPPED]


def test_a_round_merge_moves_reputation_once_even_when_retried(store):
    run = _run(store)
    down = {"bad": ReputationUpdate(0.0, 0.5, "refused: NaN"), "good": ReputationUpdate(1.0, 0.3, "accepted")}
    first = store.record_round_merge(run.run_id, 0, nodes={"good": 60.0}, trusted=True, updates=down,
                                     experimental_path="/r/exp", experimental_sha256="e" * 64,
                                     experimental_nodes={"good": 60.0, "bad": 30.0})
    assert store.node_reputation("bad") == pytest.approx(0.5)
    assert first.reputation["bad"] == {"reason": "refused: NaN", "after": pytest.approx(0.5)}
    # The merge is retried (its worker died after recording): what it made is updated, nobody moves again.
    again = store.record_round_merge(run.run_id, 0, nodes={"good": 61.0}, trusted=False, updates=down)
    assert store.node_reputation("bad") == pytest.approx(0.5)
    assert again.nodes == {"good": 61.0} and again.reputation == first.reputation
    assert again.experimental_path is None and first.trusted and not again.trusted
    # The next round is another piece of evidence.
    store.record_round_merge(run.run_id, 1, nodes={"good": 60.0}, trusted=True, updates=down)
    assert store.node_reputation("bad") == pytest.approx(0.25)


def test_the_nodes_inside_an_adapter(store):
    run = _run(store)
    store.record_round_merge(run.run_id, 0, nodes={"a": 60.0}, trusted=True, updates={}, experimental_path="/r/exp",
                             experimental_nodes={"a": 60.0, "b": 30.0})
    ref = AdapterRef(run.run_id, 0, None, None, "/r/adapter")
    assert store.adapter_nodes(ref) == {"a": 60.0}
    assert store.adapter_nodes(AdapterRef(run.run_id, 0, None, None, "/r/exp")) == {"a": 60.0, "b": 30.0}
    assert store.adapter_nodes(AdapterRef("chain", 3, "c", None, "/c")) == {"c": 1.0}
    assert store.adapter_nodes(AdapterRef("hand", 0, None, None, "/h")) == {}
