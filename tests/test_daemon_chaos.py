"""Chaos: a chained run survives SIGKILLs of the daemon and of its run workers at random moments.

The real `dagster-daemon` drives a 3-job run. While jobs train, the test kills (SIGKILL, no
clean-up) the daemon and its code server, or the run worker of the job in flight and its step
process. Dagster's run retries (after `dead_worker_sensor` marks a dead worker's run failed)
and the sensors' run keys must carry the run to completion: no job succeeds twice, no adapter is
lost or lands in two candidates, the candidate is gated. Slow by nature (~5-8 minutes).

Only processes this test started are killed: run workers are found by the test's own
DAGSTER_HOME in their environment, the daemon by the pid the test holds.
"""

import random
import time
from collections import Counter

import dagster as dg
import psutil
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.daemon import Daemon, wait_for

DIALECT = "en-gb-scotland"
JOBS = 3


def worker_processes(job, dagster_home: str) -> list[psutil.Process]:
    """The job's run worker (the pid it recorded: its step runs in-process), started by this
    test's daemon (checked by its DAGSTER_HOME)."""
    try:
        worker = psutil.Process(job.worker_pid)
        return [worker] if worker.environ().get("DAGSTER_HOME") == dagster_home else []
    except psutil.Error:
        return []


def all_gone(procs: list[psutil.Process]) -> bool:
    try:
        return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return all_gone([p for p in procs if p.is_running()])


def training_job(store: StateStore, run_id: str):
    """A job of the run that is training right now (it has reported a step)."""
    for job in store.jobs_for_run(run_id):
        if job.status == "running" and (job.progress or {}).get("step", 0) > 0:
            return job
    return None


@pytest.mark.slow
def test_a_chained_run_survives_random_sigkills_of_daemon_and_workers(registered_base, mloc_home):
    instance, _ = registered_base
    dagster_home = str(mloc_home / "dagster")
    store = StateStore(resolve_state_url())
    rng = random.Random(21)
    daemon = Daemon(mloc_home, MLOC_HEARTBEAT_TTL_S="10")
    daemon.start()
    kills = []
    try:
        run = start_run(instance, store, StartRequest(DIALECT, jobs=JOBS, candidate_every=JOBS, timebox_s=25,
                        hparams={"batch_size": 4}))
        plan = ["worker", "daemon", "worker"]
        rng.shuffle(plan)
        for what in plan:
            job = wait_for(lambda: training_job(store, run.run_id), 600, "a job in training", daemon)
            time.sleep(rng.uniform(1.0, 6.0))
            if what == "daemon":
                daemon.kill()
                time.sleep(rng.uniform(0.5, 3.0))
                daemon.start()
                kills.append(("daemon", job.job_index))
                continue
            victims = worker_processes(job, dagster_home)
            for proc in victims:
                proc.kill()
            kills.append(("worker", job.job_index, len(victims)))
            # the next kill waits for training to start again (a retry or the next job)
            wait_for(lambda gone=victims: all_gone(gone), 30, "the killed workers to be gone", daemon)

        def settled():
            current = store.get_run(run.run_id)
            if current.status not in ("completed", "failed", "paused", "cancelled"):
                return None
            candidates = [c for c in store.list_candidates(DIALECT, limit=None) if c.training_run_id == run.run_id]
            return current if candidates and all(c.gate_decision for c in candidates) else None
        final = wait_for(settled, 900, f"the run to finish after kills {kills}", daemon)
    finally:
        daemon.stop()

    assert final.status == "completed", f"{final.status}: {final.status_reason}; kills {kills}"
    train_runs = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id}))
    successes = Counter(int(r.dagster_run.tags["mloc/job_index"]) for r in train_runs
                        if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS)
    assert successes == Counter(range(JOBS)), f"each job exactly once to success: {successes}; kills {kills}"
    worker_kills = [k for k in kills if k[0] == "worker" and k[2] > 0]
    retried = [r for r in train_runs if int(r.dagster_run.tags.get("dagster/retry_number", "0")) > 0]
    assert len(retried) >= len(worker_kills) > 0, f"every killed job was retried: {kills}"

    jobs = store.jobs_for_run(run.run_id)
    assert [j.status for j in jobs] == ["succeeded"] * JOBS
    (candidate,) = [c for c in store.list_candidates(DIALECT, limit=None) if c.training_run_id == run.run_id]
    assert {j.candidate_id for j in jobs} == {candidate.candidate_id}, "every adapter claimed by the one candidate"
    # a run's newest adapter holds all of its jobs' training (each job resumes the previous one)
    assert [(s.run_id, s.job_index) for s in candidate.sources] == [(run.run_id, JOBS - 1)]
    assert candidate.gate_decision in ("passed", "failed") and candidate.gate_report_path
