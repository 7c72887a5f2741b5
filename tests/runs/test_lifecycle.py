"""A run's lifecycle in seed 003's words and its job's last log lines, from Dagster's own records."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.lifecycle import lifecycle, log_tail
from mloc_dagster.runs.service import StartRequest, pause_run, start_run


def test_lifecycle_words_and_log_lines_of_a_real_job(registered_base):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, timebox_s=60))
    assert lifecycle(instance, run)["state"] == "scheduled"  # nothing launched yet: the sensor will
    started = instance.add_run(dg.DagsterRun(job_name="train_adapter_job", run_id=str(uuid.uuid4()),
                                             status=dg.DagsterRunStatus.STARTED, tags={"mloc/run_id": run.run_id}))
    assert lifecycle(instance, run)["state"] == "running"
    instance.report_run_failed(started)
    assert lifecycle(instance, run)["state"] == "retrying"  # the project's instance retries failed runs
    config = {"run_id": run.run_id, "job_index": 0, "timebox_s": 60, "max_steps": 2, "batch_size": 4}
    result = defs.resolve_job_def("train_adapter_job").execute_in_process(
        partition_key="en-gb-scotland", instance=instance, run_config={"ops": {"adapter_checkpoint": {"config": config}}},
        tags={"mloc/run_id": run.run_id, "mloc/job_index": "0"})
    life = lifecycle(instance, run)
    assert (life["state"], life["dagster_run_id"], life["retries"]) == ("scheduled", result.run_id, 0)
    lines = log_tail(instance, result.run_id, 200)
    assert any("adapter job done" in line for line in lines), lines[-5:]
    assert len(log_tail(instance, result.run_id, 3)) == 3
    pause_run(store, run.run_id)
    assert lifecycle(instance, store.get_run(run.run_id))["state"] == "paused"

    cli = [str(Path(sys.executable).parent / "mloc")]
    out = subprocess.run([*cli, "run", "logs", run.run_id, "--tail", "50"], capture_output=True, text=True, check=True)
    assert "adapter job done" in out.stdout and result.run_id in out.stdout
    status = json.loads(subprocess.run([*cli, "run", "status", run.run_id, "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    assert status["lifecycle"]["state"] == "paused" and status["lifecycle"]["retries"] == 0
    assert dg.DagsterRunStatus.SUCCESS.value == status["lifecycle"]["dagster_status"]


def test_the_launchpad_config_is_start_requests_fields():
    """`start_training_run`'s config is derived from StartRequest: a field added to the request
    reaches the launchpad with its default, none is repeated by hand."""
    from dataclasses import MISSING, fields

    from mloc_dagster.runs.service import StartRequest, StartRunConfig

    declared = {f.name: f for f in fields(StartRequest)}
    assert set(StartRunConfig.model_fields) == set(declared)
    for name, f in declared.items():
        default = StartRunConfig.model_fields[name].default
        if name in ("hparams", "space"):  # JSON objects in the launchpad
            assert default == {}
        elif f.default is not MISSING:
            assert default == f.default, name
