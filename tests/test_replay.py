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

from tests.daemon import Daemon

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


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
