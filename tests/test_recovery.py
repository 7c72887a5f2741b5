"""Failure recovery with real processes: a SIGKILLed training worker, a SIGKILLed daemon, four
concurrent runs on the embedded SQLite default, and a full disk. Slow by nature (real daemon,
real run workers): a few minutes in all."""

import signal
import time

import dagster as dg
import psutil
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.daemon import Daemon, wait_for

DIALECT = "en-gb-scotland"


@pytest.fixture()
def daemon(registered_base, mloc_home):
    d = Daemon(mloc_home, MLOC_HEARTBEAT_TTL_S="8")
    d.start()
    yield d
    d.stop()


def train_runs(instance, run_id, job_index=None):
    tags = {"mloc/run_id": run_id} | ({"mloc/job_index": str(job_index)} if job_index is not None else {})
    return instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags=tags),
                                    order_by="create_timestamp", ascending=True)


@pytest.mark.slow
def test_sigkilled_training_worker_is_retried_and_resumes_from_its_checkpoint(registered_base, daemon, mloc_home):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                    hparams={"max_steps": 600, "batch_size": 4, "checkpoint_every_s": 2}))
    job_dir = mloc_home / "adapters" / DIALECT / run.run_id / "job-0000"
    partial = job_dir.parent / "job-0000.partial"

    def checkpoint_written():
        steps = [p for p in partial.glob("step-*") if (p / "train_state.json").is_file()] if partial.is_dir() else []
        job = store.get_job(run.run_id, 0)
        return steps and job and job.status == "running" and job.worker_pid
    wait_for(checkpoint_written, 300, "an intermediate checkpoint", daemon)
    time.sleep(1)
    job = store.get_job(run.run_id, 0)
    # The job's step runs in its run worker (in-process executor), forked by the warm launcher.
    run_worker = psutil.Process(job.worker_pid)
    assert "forkserver" in " ".join(run_worker.parent().cmdline())
    killed_at = time.time()
    # The run worker dies with no chance to report anything: nothing is left that knows the run
    # is dead but the heartbeat in the state store, and the pid on this node.
    run_worker.send_signal(signal.SIGKILL)
    last_partial_mtime = max(p.stat().st_mtime for p in partial.glob("step-*"))

    # dead_worker_sensor fails the orphaned run; Dagster's run retries start it again
    def succeeded():
        runs = train_runs(instance, run.run_id, 0)
        return runs if any(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs) else None
    def diagnose():
        runs = [(r.dagster_run.run_id[:8], r.dagster_run.status.value, r.dagster_run.tags.get("dagster/retry_number"))
                for r in train_runs(instance, run.run_id)]
        return f"job: {store.get_job(run.run_id, 0)}; Dagster runs: {runs}"
    runs = wait_for(succeeded, 600, "the retried job to succeed", daemon, diagnose)
    first, retry = runs[0].dagster_run, runs[-1].dagster_run
    assert first.status == dg.DagsterRunStatus.FAILURE
    assert retry.tags.get("dagster/retry_number") == "1" and retry.status == dg.DagsterRunStatus.SUCCESS
    messages = " ".join(e.message or "" for e in instance.all_logs(first.run_id))
    assert f"worker pid {run_worker.pid}" in messages and "died" in messages  # dead_worker_sensor's reason

    mat = instance.get_latest_materialization_event(dg.AssetKey("adapter_checkpoint")).asset_materialization
    assert mat.metadata["resumed_kind"].value == "partial"
    assert mat.metadata["total_steps"].value == 600
    assert killed_at - last_partial_mtime <= 2 + 3  # work lost ≤ checkpoint interval (+ scheduling slack)
    assert store.get_job(run.run_id, 0).attempts == 2


@pytest.mark.slow
def test_sigkilled_daemon_between_jobs_launches_the_next_job_exactly_once(registered_base, daemon):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=2, timebox_s=60,
                    hparams={"max_steps": 2, "batch_size": 4}))
    wait_for(lambda: store.get_run(run.run_id).last_finished_job == 0, 300, "job 0", daemon)
    daemon.kill()  # between job 0's success and (most likely) the request for job 1
    daemon.start()
    wait_for(lambda: store.get_run(run.run_id).status == "completed", 300, "the run to complete", daemon)
    assert [r.dagster_run.tags["mloc/job_index"] for r in train_runs(instance, run.run_id)] == ["0", "1"]


@pytest.mark.slow
def test_four_concurrent_runs_on_sqlite(registered_base, mloc_home):
    instance, _ = registered_base
    instance.event_log_storage.set_concurrency_slots("gpu", 4)  # let the four steps overlap ...
    daemon = Daemon(mloc_home, MLOC_CPU_SLOTS="4")  # ... and the arbiter lease four CPU slots
    daemon.start()
    try:
        check_four_runs(instance, daemon)
    finally:
        daemon.stop()


def check_four_runs(instance, daemon):
    store = StateStore(resolve_state_url())
    runs = [start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=45,
                      hparams={"batch_size": 4, "seed": i, "checkpoint_every_s": 5})) for i in range(4)]
    def all_finished():
        records = [rec for r in runs for rec in train_runs(instance, r.run_id)]
        done = len(records) == 4 and all(rec.dagster_run.is_finished for rec in records)
        return records if done and all(store.get_run(r.run_id).status == "completed" for r in runs) else None
    records = wait_for(all_finished, 420, "four runs to complete", daemon)
    assert len(records) == 4 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    overlap = max(r.start_time for r in records) < min(r.end_time for r in records)
    assert overlap, "the four runs did not run concurrently"
    for rec in records:
        logs = " ".join(e.message or "" for e in instance.all_logs(rec.dagster_run.run_id))
        assert "database is locked" not in logs
    assert "database is locked" not in daemon.tail()
