"""The warm-fork run launcher with the real daemon: a run worker is a fork of the warm process,
its step runs in-process, and `terminate` cancels it cleanly."""

import dagster as dg
import psutil
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.execution.launcher import WORKER_TAG, WarmForkRunLauncher, _worker_process
from mloc_dagster.runs.service import StartRequest, cancel_run, start_run
from tests.daemon import Daemon, wait_for

DIALECT = "en-gb-scotland"


def test_a_worker_tag_never_names_a_recycled_pid():
    me = psutil.Process()
    assert _worker_process(f"{me.pid}:{me.create_time():.3f}").pid == me.pid
    assert _worker_process(f"{me.pid}:{me.create_time() - 5:.3f}") is None  # same pid, another process
    assert _worker_process(None) is None and _worker_process("garbage") is None


@pytest.mark.slow
def test_runs_are_forked_from_the_warm_process_and_terminate_cleanly(registered_base, mloc_home):
    instance, _ = registered_base
    assert isinstance(instance.run_launcher, WarmForkRunLauncher)
    store = StateStore(resolve_state_url())
    daemon = Daemon(mloc_home)
    daemon.start()
    try:
        run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                        hparams={"max_steps": 100_000, "batch_size": 4}))

        def training():
            job = store.get_job(run.run_id, 0)
            return job if job and job.status == "running" and (job.progress or {}).get("step", 0) > 0 else None
        job = wait_for(training, 300, "the job to train", daemon)
        record = instance.get_run_records(dg.RunsFilter(tags={"mloc/run_id": run.run_id}), limit=1)[0]
        worker = psutil.Process(job.worker_pid)
        # One process per run: the step's pid is the run worker's, and its parent the warm process.
        assert record.dagster_run.tags[WORKER_TAG].startswith(f"{worker.pid}:")
        assert "forkserver" in " ".join(worker.parent().cmdline())
        assert worker.parent().pid != daemon.proc.pid

        assert cancel_run(instance, store, run.run_id) == [record.dagster_run.run_id]
        wait_for(lambda: instance.get_run_by_id(record.dagster_run.run_id).status == dg.DagsterRunStatus.CANCELED,
                 120, "the run to be canceled", daemon)
        psutil.wait_procs([worker], timeout=60)
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        daemon.stop()
