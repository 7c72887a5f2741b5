"""The distributed half of the training chain on a real instance and state store: placement by
throughput, per-node tags, quotas, stragglers, silent nodes and the round merge request.
Slices are driven through the store here; tests/test_daemon_distributed.py trains them for real."""

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg

from mloc_dagster.assets.pool.rounds import ROUND_MERGE_JOB
from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.schema import DROPPED, QUEUED, REPLACED, RUNNING
from mloc_dagster.execution.k8s import K8S_CONFIG_TAG, NODE_LABEL
from mloc_dagster.runs.service import resume_run
from tests.sensors.conftest import tick

BASE = "ab" * 32  # a base model directory named by its content hash, as the base_model asset writes it



def pool(store, speeds):
    for node, speed in speeds.items():
        store.record_job_throughput(node, BASE, speed, source="calibrate")


def new_run(store, **kw):
    return store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version=f"/models/{BASE}",
                            timebox_s=60, max_jobs=2, candidate_every=2, kind="distributed",
                            **{"parallelism": 3, "round_samples": 120, **kw})


def test_a_round_is_placed_by_throughput_and_merged_when_its_slices_are_in(instance, store):
    pool(store, {"node-a": 10.0, "node-b": 20.0, "node-c": 30.0, "node-slow": 1.0, "node-drained": 99.0,
                 "node-spent": 99.0})
    store.set_node_drained("node-drained", True, "maintenance")
    store.set_node_quota("node-spent", 0)
    run = new_run(store)
    result, cursor = tick(instance, store)
    slices = {r.tags["mloc/node"]: r for r in result.run_requests}
    assert set(slices) == {"node-a", "node-b", "node-c"}  # the three fastest that may work: not drained, quota left
    assert {r.job_name for r in result.run_requests} == {TRAIN_JOB}
    assert sorted(r.run_key for r in result.run_requests) == [f"{run.run_id}/0/{i}" for i in range(3)]
    placed = store.round_slices(run.run_id, 0)
    assert [s.samples for s in placed] == [20, 40, 60]  # proportional to 10:20:30
    assert sum(s.samples for s in placed) == 120 and placed[0].segments == [[0, 20]]
    req = slices["node-c"]
    assert req.run_config["ops"]["adapter_checkpoint"]["config"]["slice_index"] == 2
    assert json.loads(req.tags[K8S_CONFIG_TAG])["pod_spec_config"]["node_selector"][NODE_LABEL] == "node-c"
    assert all(store.get_node(n).jobs_today == 1 for n in ("node-a", "node-b", "node-c"))  # quota at placement
    assert store.get_node("node-slow").jobs_today == 0

    for s in placed:
        store.record_slice_started(run.run_id, 0, s.slice_index, dagster_run_id=f"d{s.slice_index}")
        store.slice_training_started(run.run_id, 0, s.slice_index)
    again, cursor = tick(instance, store, cursor)
    assert [r.job_name for r in again.run_requests] == []  # in flight: nothing new
    for s in placed:
        store.record_slice_finished(run.run_id, 0, s.slice_index, "succeeded", checkpoint_path=f"/s{s.slice_index}")
    merge, cursor = tick(instance, store, cursor)
    assert [(r.job_name, r.run_key) for r in merge.run_requests] == [(ROUND_MERGE_JOB, f"{run.run_id}/0/merge")]
    assert merge.run_requests[0].run_config["ops"]["round_adapter"]["config"] == {"run_id": run.run_id,
                                                                                   "round_index": 0}


def test_a_run_can_train_its_first_round_on_one_node_then_pool(instance, store):
    """Post-local (docs/distributed.md): round 0 is one slice of all its samples on the fastest node,
    trained with the run's warm-up; the rounds after it are placed on up to `parallelism` nodes."""
    pool(store, {"node-a": 10.0, "node-b": 20.0, "node-c": 30.0})
    run = new_run(store, first_round_on_one_node=True)
    assert store.get_run(run.run_id).first_round_on_one_node
    result, cursor = tick(instance, store)
    [first] = store.round_slices(run.run_id, 0)
    assert (first.node_id, first.samples, first.segments) == ("node-c", 120, [[0, 120]])
    [request] = result.run_requests
    assert request.tags["mloc/node"] == "node-c"
    store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d0")
    store.record_slice_finished(run.run_id, 0, 0, "succeeded", checkpoint_path="/s0")
    merge, cursor = tick(instance, store, cursor)
    assert [r.job_name for r in merge.run_requests] == [ROUND_MERGE_JOB]
    store.record_job_started(run.run_id, 0, dagster_run_id="m0")
    store.record_job_finished(run.run_id, 0, "succeeded", checkpoint_path="/round0", base_model=BASE)
    tick(instance, store, cursor)
    second = store.round_slices(run.run_id, 1)
    assert sorted(s.node_id for s in second) == ["node-a", "node-b", "node-c"]
    assert sorted(seg for s in second for seg in s.segments)[0][0] == 120  # fresh samples after round 0's
    assert not store.get_run(new_run(store).run_id).first_round_on_one_node  # the default: pooled from round 0


def test_a_straggler_is_dropped_at_the_deadline_and_its_samples_go_to_the_next_round(instance, store):
    pool(store, {"node-a": 10.0, "node-b": 10.0})
    run = new_run(store, parallelism=2, round_samples=100)
    _, cursor = tick(instance, store)
    a, b = store.round_slices(run.run_id, 0)
    for s in (a, b):
        store.record_slice_started(run.run_id, 0, s.slice_index, dagster_run_id="d")
    # Both started training 30 s ago; expected 5 s each: the deadline (5 + 15 s) has passed.
    past = StateStore(store.url, clock=lambda: datetime.now(UTC) - timedelta(seconds=30))
    for s in (a, b):
        past.slice_training_started(run.run_id, 0, s.slice_index)
        past.heartbeat_slice(run.run_id, 0, s.slice_index, {"samples": 10})
    store.record_slice_finished(run.run_id, 0, a.slice_index, "succeeded", checkpoint_path="/a")
    result, cursor = tick(instance, store, cursor)
    assert [r.job_name for r in result.run_requests] == [ROUND_MERGE_JOB]
    late = store.get_slice(run.run_id, 0, b.slice_index)
    assert late.status == DROPPED and late.outcome.startswith("late")
    assert store.get_node("node-b").samples_per_s(BASE) < 10.0  # lowered from what it managed

    # The round merged (as the round merge records it): round 1 starts with node-b's 50 samples.
    store.record_job_started(run.run_id, 0, dagster_run_id="m0")
    store.record_job_finished(run.run_id, 0, "succeeded", checkpoint_path="/round0", base_model=BASE)
    tick(instance, store, cursor)
    second = store.round_slices(run.run_id, 1)
    covered = sorted(seg for s in second for seg in s.segments)
    assert covered[0] == [50, 100] and sum(b - a for a, b in covered) == 100
    assert covered[-1][1] == 150  # then 50 fresh samples after round 0's


def test_a_silent_node_is_replaced_and_an_empty_pool_pauses_the_run(instance, store, monkeypatch):
    monkeypatch.setattr("mloc_dagster.sensors.rounds.SILENT_AFTER_S", 0.0)
    pool(store, {"node-a": 10.0})
    run = new_run(store, parallelism=2, round_samples=40)
    result, cursor = tick(instance, store)
    assert len(result.run_requests) == 1  # one node: fewer slices, with a warning
    store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d")
    pool(store, {"node-b": 10.0})
    result, cursor = tick(instance, store, cursor)
    old, new = store.round_slices(run.run_id, 0)
    assert (old.status, new.node_id, new.replaces, new.segments) == (REPLACED, "node-b", 0, old.segments)
    assert f"{run.run_id}/0/1" in [r.run_key for r in result.run_requests]

    other = store.create_run(
        dialect="en-gb-wales", dataset_version="/d", base_model_version="/models/" + "cd" * 32, kind="distributed",
        parallelism=2, round_samples=40)
    tick(instance, store, cursor)
    paused = store.get_run(other.run_id)
    assert paused.status == "paused" and "no node available" in paused.status_reason
    assert "no throughput measured" in paused.status_reason


def test_a_round_takes_eight_or_more_slices(instance, store):
    pool(store, {f"node-{i:02d}": 5.0 + i for i in range(10)})
    run = new_run(store, parallelism=8, round_samples=800)
    result, _ = tick(instance, store)
    placed = store.round_slices(run.run_id, 0)
    assert len(result.run_requests) == len(placed) == 8
    assert {s.node_id for s in placed} == {f"node-{i:02d}" for i in range(2, 10)}  # the eight fastest
    assert sum(s.samples for s in placed) == 800
    assert len({r.run_key for r in result.run_requests}) == 8


def test_a_slice_that_finished_training_is_not_dropped_while_it_evaluates(instance, store):
    pool(store, {"node-a": 10.0, "node-b": 10.0})
    run = new_run(store, parallelism=2, round_samples=100)
    _, cursor = tick(instance, store)
    a, b = store.round_slices(run.run_id, 0)
    for s in (a, b):
        store.record_slice_started(run.run_id, 0, s.slice_index, dagster_run_id="d")
    # Both started training 30 s ago (expected 5 s, deadline 20 s after); "b" ended its last step
    # within its deadline and has been evaluating and saving since: slow, healthy, heartbeating.
    started = StateStore(store.url, clock=lambda: datetime.now(UTC) - timedelta(seconds=30))
    for s in (a, b):
        started.slice_training_started(run.run_id, 0, s.slice_index)
    StateStore(store.url, clock=lambda: datetime.now(UTC) - timedelta(seconds=12)).slice_training_ended(
        run.run_id, 0, b.slice_index)
    store.heartbeat_slice(run.run_id, 0, b.slice_index, {"samples": 50})
    store.record_slice_finished(run.run_id, 0, a.slice_index, "succeeded", checkpoint_path="/a")
    result, cursor = tick(instance, store, cursor)
    assert result.run_requests == []  # no merge without it
    assert store.get_slice(run.run_id, 0, b.slice_index).status == RUNNING
    assert store.get_node("node-b").samples_per_s(BASE) == 10.0  # its throughput is not cut
    store.record_slice_finished(run.run_id, 0, b.slice_index, "succeeded", checkpoint_path="/b")
    result, _ = tick(instance, store, cursor)
    assert [r.job_name for r in result.run_requests] == [ROUND_MERGE_JOB]


def dagster_run_of(instance, run, job_name, status, **tags):
    return instance.add_run(dg.DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=status,
                                          tags={"mloc/run_id": run.run_id, **tags}))


def test_canceled_slices_are_requested_again_on_resume_and_their_round_is_never_failed(instance, store):
    pool(store, {"node-a": 10.0, "node-b": 10.0})
    run = new_run(store, parallelism=2, round_samples=100)
    _, cursor = tick(instance, store)
    for s in store.round_slices(run.run_id, 0):  # both slices canceled: 0 successes in the round
        canceled = dagster_run_of(instance, run, TRAIN_JOB, dg.DagsterRunStatus.STARTED,
                                  **{"mloc/round": "0", "mloc/slice": str(s.slice_index)})
        store.record_slice_started(run.run_id, 0, s.slice_index, dagster_run_id=canceled.run_id)
        instance.report_run_canceled(canceled, message="terminated in the UI")
    result, cursor = tick(instance, store, cursor)
    paused = store.get_run(run.run_id)
    assert result.run_requests == [] and paused.status == "paused" and "was canceled" in paused.status_reason
    assert [s.status for s in store.round_slices(run.run_id, 0)] == [QUEUED, QUEUED]

    assert resume_run(store, run.run_id)
    result, cursor = tick(instance, store, cursor)
    assert store.get_run(run.run_id).status == "active"
    assert sorted(r.run_key for r in result.run_requests) == [f"{run.run_id}/0/0/g1", f"{run.run_id}/0/1/g1"]
    assert [s.node_id for s in store.round_slices(run.run_id, 0)] == ["node-a", "node-b"]  # the same placement
    assert all(store.get_node(n).jobs_today == 1 for n in ("node-a", "node-b"))  # its quota, not taken twice
    again = tick(instance, store, cursor)[0]  # the same keys: Dagster launches each once
    assert sorted(r.run_key for r in again.run_requests) == [f"{run.run_id}/0/0/g1", f"{run.run_id}/0/1/g1"]


def test_a_canceled_round_merge_is_requested_again_on_resume(instance, store):
    pool(store, {"node-a": 10.0})
    run = new_run(store, parallelism=1, round_samples=40)
    _, cursor = tick(instance, store)
    store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d")
    store.record_slice_finished(run.run_id, 0, 0, "succeeded", checkpoint_path="/s0")
    result, cursor = tick(instance, store, cursor)
    assert [r.run_key for r in result.run_requests] == [f"{run.run_id}/0/merge"]
    canceled = dagster_run_of(instance, run, ROUND_MERGE_JOB, dg.DagsterRunStatus.STARTED, **{"mloc/round": "0"})
    instance.report_run_canceled(canceled, message="terminated in the UI")
    result, cursor = tick(instance, store, cursor)
    assert result.run_requests == [] and store.get_run(run.run_id).status == "paused"
    assert resume_run(store, run.run_id)
    result, _ = tick(instance, store, cursor)
    assert [(r.job_name, r.run_key) for r in result.run_requests] == [(ROUND_MERGE_JOB, f"{run.run_id}/0/merge/g1")]


def test_after_a_resume_a_slice_still_queued_in_dagster_is_not_requested_twice(instance, store):
    pool(store, {"node-a": 10.0, "node-b": 10.0})
    run = new_run(store, parallelism=2, round_samples=100)
    _, cursor = tick(instance, store)
    # Slice 0's run is not launched yet (its node is busy); slice 1's run was canceled.
    dagster_run_of(instance, run, TRAIN_JOB, dg.DagsterRunStatus.NOT_STARTED, **{"mloc/round": "0", "mloc/slice": "0"})
    canceled = dagster_run_of(instance, run, TRAIN_JOB, dg.DagsterRunStatus.STARTED,
                              **{"mloc/round": "0", "mloc/slice": "1"})
    instance.report_run_canceled(canceled, message="terminated in the UI")
    _, cursor = tick(instance, store, cursor)
    assert store.get_run(run.run_id).status == "paused"
    assert resume_run(store, run.run_id)
    result, _ = tick(instance, store, cursor)
    assert [r.run_key for r in result.run_requests] == [f"{run.run_id}/0/1/g1"]  # slice 0's queued run trains it


def test_on_a_ray_pool_a_slice_waiting_for_a_dead_node_is_placed_again_and_its_run_canceled(
        store, mloc_home, monkeypatch):
    """A slice placed on a node that died before its run started would wait for a resource no node
    offers (docs/pool.md: until run monitoring's start timeout, for each retry). On a Ray pool the
    round places it again as soon as Ray reports the node dead, and Dagster cancels its waiting run;
    the canceled run then pauses nothing. Ray's node table is given here as data (the real table is
    read on a real cluster in tests/deploy/test_ray_pool.py); off Ray a waiting slice waits (the tests above)."""
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin

    from mloc_dagster.core.pool.ray_cluster import RayNode

    table = {n: RayNode(n, f"ray-{n}", "10.0.0.1", alive=True, gpus=1.0) for n in ("node-a", "node-b", "node-c")}
    monkeypatch.setenv("MLOC_RAY_DASHBOARD", "http://10.0.0.1:8265")
    monkeypatch.setattr("mloc_dagster.core.pool.assign.pool_ray_table", lambda: table)
    queued_coordinator = {"run_coordinator": {"module": "dagster._core.run_coordinator",
                                              "class": "QueuedRunCoordinator"}}
    with dg.instance_for_test(overrides=queued_coordinator) as instance:
        pool(store, {"node-a": 20.0, "node-b": 10.0, "node-c": 5.0})
        run = new_run(store, parallelism=2, round_samples=60)
        _, cursor = tick(instance, store)
        a, b = store.round_slices(run.run_id, 0)
        assert (a.node_id, b.node_id) == ("node-a", "node-b")
        store.record_slice_started(run.run_id, 0, a.slice_index, dagster_run_id="d0")
        waiting = instance.add_run(dg.DagsterRun(  # in Dagster's queue (node-b's concurrency slot is taken)
            job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.QUEUED,
            remote_job_origin=RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("mloc"),
                                                                     "__repository__"), TRAIN_JOB),
            tags={"mloc/run_id": run.run_id, "mloc/round": "0", "mloc/slice": str(b.slice_index)}))
        assert tick(instance, store, cursor)[0].run_requests == []  # alive: it waits its turn

        table["node-b"] = replace(table["node-b"], alive=False, state_message="raylet died")
        result, cursor = tick(instance, store, cursor)
        old, new = store.round_slices(run.run_id, 0)[1:]
        assert old.status == REPLACED and old.outcome.startswith("node node-b unavailable: dead in the Ray cluster")
        # placed like a silent slice's samples: on the fastest alive node (its slot frees after its own slice)
        assert (new.node_id, new.replaces, new.segments) == ("node-a", old.slice_index, old.segments)
        assert [r.run_key for r in result.run_requests] == [f"{run.run_id}/0/{new.slice_index}"]
        assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.CANCELED
        tick(instance, store, cursor)  # the canceled run is read: its slice was replaced, nothing pauses
        assert store.get_run(run.run_id).status == "active"
        assert store.get_slice(run.run_id, 0, old.slice_index).status == REPLACED


def test_a_silent_slice_that_finishes_while_it_is_replaced_gives_the_quota_back(instance, store, monkeypatch):
    """The replacement's placement takes a job of quota from the new node; when the slice finishes
    first (the compare-and-set of its end loses), no new slice is placed and the quota goes back."""
    from mloc_dagster.core.state import StateStore as Store

    monkeypatch.setattr("mloc_dagster.sensors.rounds.SILENT_AFTER_S", 0.0)
    pool(store, {"node-a": 10.0})
    run = new_run(store, parallelism=1, round_samples=40)
    _, cursor = tick(instance, store)
    store.record_slice_started(run.run_id, 0, 0, dagster_run_id="d")
    pool(store, {"node-b": 10.0})
    real_end = Store.end_slice

    def finished_first(self, run_id, k, index, *args, **kwargs):
        self.record_slice_finished(run_id, k, index, "succeeded", checkpoint_path="/s0")  # the race, lost
        return real_end(self, run_id, k, index, *args, **kwargs)

    monkeypatch.setattr(Store, "end_slice", finished_first)
    tick(instance, store, cursor)
    assert [s.status for s in store.round_slices(run.run_id, 0)] == ["succeeded"]
    assert store.get_node("node-b").jobs_today == 0
