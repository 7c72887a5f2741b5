"""A slice's job of daily quota: a canceled slice is requeued with it (read by the real
training-chain sensor from a real run record); a slice that ends without ever starting gives it
back; a slice that started keeps it used."""

import uuid

import dagster as dg

from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.state.schema import DROPPED, QUEUED, RUNNING
from tests.sensors.conftest import tick

BASE = "cd" * 32


def canceled_slice_run(instance, run, s):
    dagster_run = instance.add_run(dg.DagsterRun(
        job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED,
        tags={"mloc/run_id": run.run_id, "mloc/round": "0", "mloc/slice": str(s.slice_index),
              "mloc/node": s.node_id}))
    instance.report_run_canceled(dagster_run, message="canceled in the queue")


def test_a_slice_canceled_before_it_started_gives_its_quota_back(instance, store):
    for node in ("node-a", "node-b"):
        store.record_job_throughput(node, BASE, 10.0, source="calibrate")
    run = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version=f"/models/{BASE}",
                           timebox_s=60, max_jobs=2, candidate_every=2, kind="distributed", parallelism=2,
                           round_samples=40)
    _, cursor = tick(instance, store)
    waiting, started = store.round_slices(run.run_id, 0)
    assert {store.get_node(n).jobs_today for n in ("node-a", "node-b")} == {1}  # taken at placement
    store.record_slice_started(run.run_id, 0, started.slice_index, dagster_run_id="d1")
    for s in (waiting, started):
        canceled_slice_run(instance, run, s)
    tick(instance, store, cursor)
    # A canceled slice is requeued for the resume (its placement's quota kept for that retry); the
    # started one is trained by another Dagster run (d1), which this cancel does not stop.
    assert [s.status for s in store.round_slices(run.run_id, 0)] == [QUEUED, RUNNING]
    assert {store.get_node(n).jobs_today for n in ("node-a", "node-b")} == {1}
    # Ended without ever starting (dropped or replaced by the round): the quota comes back, once.
    assert store.end_slice(run.run_id, 0, waiting.slice_index, DROPPED, "dropped before it started")
    assert store.get_node(waiting.node_id).jobs_today == 0  # never started: given back
    assert store.get_node(started.node_id).jobs_today == 1  # it started: used
