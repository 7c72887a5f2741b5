"""`mloc run replay`: a failed run launched through the workspace is re-executed by Dagster, with
its config and tags, as a child run; bad ids are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.conftest import REPO
from tests.daemon import Daemon, wait_for

BIN = Path(sys.executable).parent


@dg.asset
def succeeds() -> None:
    return None


def mloc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mloc"), *args], env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)


def wait_for_status(instance: dg.DagsterInstance, run_id: str, timeout_s: float = 240) -> dg.DagsterRunStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            return run.status
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish within {timeout_s} s")


@pytest.mark.slow
def test_replay_of_a_failed_run(mloc_home: Path) -> None:
    # The instance's SQLite storage exists before the daemon and the `dagster job launch` below
    # start: two processes creating it at once can stamp alembic twice ("more than one head").
    dg.DagsterInstance.get().dispose()
    daemon = Daemon(mloc_home)  # the queue: the failed run and its replay are launched by it
    daemon.start()
    try:
        _replay_round_trip(mloc_home)
    finally:
        daemon.stop()


def _replay_round_trip(mloc_home: Path) -> None:
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("dialect", ["xx-nodata"])
    # A dialect with no incoming batch: ingest fails, as a user would see it launched from the CLI.
    launched = subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "ingest_job",
         "--tags", json.dumps({"dagster/partition": "xx-nodata", "team": "speech", "dagster/max_retries": "0"})],
        env=dict(os.environ), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert launched.returncode == 0, launched.stderr
    [failed] = instance.get_runs()
    assert wait_for_status(instance, failed.run_id) == dg.DagsterRunStatus.FAILURE

    result = mloc("run", "replay", failed.run_id)
    assert result.returncode == 0, result.stderr
    new_id = result.stdout.strip()  # only the id: scripts capture it
    child = instance.get_run_by_id(new_id)
    assert child is not None and new_id != failed.run_id
    assert child.parent_run_id == failed.run_id and child.root_run_id == failed.run_id
    assert child.tags["dagster/partition"] == "xx-nodata" and child.tags["team"] == "speech"
    assert child.job_name == "ingest_job"
    wait_for_status(instance, new_id)

    # Bad input: an unknown id, a run that did not fail.
    unknown = mloc("run", "replay", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 2 and "no Dagster run 00000000" in unknown.stderr
    ok = dg.materialize([succeeds], instance=instance)
    not_failed = mloc("run", "replay", ok.run_id)
    assert not_failed.returncode == 2 and "not FAILURE" in not_failed.stderr
    instance.dispose()


@pytest.mark.slow
def test_replay_of_an_exhausted_training_job_reactivates_its_run(registered_base, mloc_home: Path) -> None:
    """Job 1 of a chain cannot save its checkpoint (a file where its directory goes) and exhausts
    Dagster's run retries: the training run fails. Once the cause is gone, `mloc run replay` of
    the last attempt re-activates the run; the replay resumes from job 0's checkpoint, the chain
    launches no second copy of job 1, and the run completes."""
    instance, _ = registered_base
    config = mloc_home / "dagster" / "dagster.yaml"  # one retry instead of three: exhausted sooner
    config.write_text(config.read_text().replace("max_retries: 3", "max_retries: 1"))
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, candidate_every=2, timebox_s=30,
                    hparams={"max_steps": 3, "batch_size": 4}))
    run_dir = mloc_home / "adapters" / "en-gb-scotland" / run.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "job-0001").write_text("in the way")
    daemon = Daemon(mloc_home)
    daemon.start()
    try:
        failed = wait_for(lambda: (r := store.get_run(run.run_id)).status == "failed" and r, 1200,
                          "job 1 to exhaust its retries", daemon)
        assert "job 1 failed after 2 attempt(s): cannot write the checkpoint of job 1" in failed.status_reason
        attempts = [r.dagster_run for r in instance.get_run_records(
            dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id, "mloc/job_index": "1"}),
            order_by="create_timestamp", ascending=True)]
        assert [a.status for a in attempts] == [dg.DagsterRunStatus.FAILURE] * 2

        (run_dir / "job-0001").unlink()  # the cause, fixed
        result = mloc("run", "replay", attempts[-1].run_id)
        assert result.returncode == 0, result.stderr
        assert f"training run {run.run_id} is active again" in result.stderr
        child = instance.get_run_by_id(result.stdout.strip())
        assert child.parent_run_id == attempts[-1].run_id and child.tags["mloc/job_index"] == "1"
        active = store.get_run(run.run_id)
        assert active.status == "active" and active.generation == 1
        assert active.status_reason.startswith(f"re-activated by `mloc run replay {attempts[-1].run_id}`: job 1 "
                                               f"re-executed as {child.run_id} (it had failed: job 1 failed after 2")

        wait_for(lambda: store.get_run(run.run_id).status == "completed" and _all_finished(instance), 1200,
                 "the replayed job, the candidate and the run's completion", daemon)
        job1 = store.get_job(run.run_id, 1)
        runs = [(r.dagster_run.run_id[:8], r.dagster_run.status.value, r.dagster_run.tags.get("dagster/run_key"),
                 r.dagster_run.tags.get("mloc/refused"))
                for r in instance.get_run_records(dg.RunsFilter(tags={"mloc/run_id": run.run_id}))]
        assert job1.status == "succeeded" and job1.dagster_run_id == child.run_id, runs
        assert child.tags["mloc/replay_of"] == attempts[-1].run_id
        assert len(instance.get_run_records(dg.RunsFilter(
            job_name="train_adapter_job", tags={"mloc/run_id": run.run_id, "mloc/job_index": "1"}))) == 3  # no copy
        resumed = json.loads((run_dir / "job-0001" / "result.json").read_text())
        assert resumed["resumed_kind"] == "resume_from"
        assert Path(resumed["resumed_from"]).resolve() == Path(store.get_job(run.run_id, 0).checkpoint_path).resolve()

        # A replay that cannot continue its run is refused before anything is launched.
        again = mloc("run", "replay", attempts[0].run_id)
        assert again.returncode == 2 and f"training run {run.run_id} is completed" in again.stderr
    finally:
        daemon.stop()


def _all_finished(instance: dg.DagsterInstance) -> bool:
    return not instance.get_run_records(dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED]), limit=1)
