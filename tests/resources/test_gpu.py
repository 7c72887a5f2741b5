"""The GpuArbiter resource on a real Dagster instance.

Two runs contend for one simulated device: one in a separate process (as Dagster would run it),
holding the device, and one in this process. What happened is read back from the instance's
materialization metadata, as a user would see it in the UI.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from mloc_dagster.core.arbiter.policy import Outcome
from mloc_dagster.core.arbiter.snapshot import read_snapshot
from mloc_dagster.resources.gpu import GpuArbiter, TaskPolicyConfig, default_state_dir


class HoldConfig(dg.Config):
    ready_file: str
    release_file: str


@dg.asset
def held_training(
    context: dg.AssetExecutionContext, gpu: GpuArbiter, config: HoldConfig
) -> dg.MaterializeResult:
    with gpu.lease("TRAIN", context) as lease:
        Path(config.ready_file).write_text(lease.outcome.value)
        deadline = time.monotonic() + 120
        while not Path(config.release_file).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return dg.MaterializeResult(metadata=lease.metadata())


@dg.asset
def contender_training(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> dg.MaterializeResult:
    with gpu.lease("TRAIN", context) as lease:
        if not lease.runnable:
            raise dg.Failure(f"no device: {lease.outcome}", metadata=lease.metadata())
    return dg.MaterializeResult(metadata=lease.metadata())


@dg.asset
def contender_eval(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> dg.MaterializeResult:
    with gpu.lease("EVAL", context) as lease:
        assert lease.torch_device == "cpu"  # the asset would run its evaluation on this device
    return dg.MaterializeResult(metadata=lease.metadata())


@dg.asset
def optional_report(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> dg.MaterializeResult:
    with gpu.lease("OPTIONAL", context) as lease:
        if lease.outcome is Outcome.SKIPPED:
            raise dg.Failure(description="GPU busy; optional report skipped", metadata=lease.metadata())
    return dg.MaterializeResult(metadata=lease.metadata())


@dg.asset
def slow_merge(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> dg.MaterializeResult:
    with gpu.lease("MERGE", context, max_hold_s=0.2) as lease:
        deadline = time.monotonic() + 30
        while not lease.watchdog_exceeded and time.monotonic() < deadline:
            time.sleep(0.02)
    return dg.MaterializeResult(metadata=lease.metadata())


def metadata_of(instance: dg.DagsterInstance, asset: str) -> dict[str, object]:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_two_runs_contend_for_one_device(tmp_path: Path, mloc_home: Path) -> None:
    state_dir = tmp_path / "gpu"
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, __file__, str(state_dir), str(ready), str(release)],
        env=dict(os.environ),  # the same DAGSTER_HOME and MLOC_HOME as this test
    )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert holder.poll() is None, "holder run exited early"
            assert time.monotonic() < deadline, "holder run never took the device"
            time.sleep(0.05)
        assert ready.read_text() == "ACQUIRED"

        instance = dg.DagsterInstance.get()
        gpu = GpuArbiter(
            state_dir=str(state_dir), simulated_devices=1, policies={"EVAL": TaskPolicyConfig(max_wait_s=1.0)}
        )
        snapshot = gpu.snapshot()
        assert [lease["holder"].split("/")[-1] for lease in snapshot["leases"]] == ["held_training"]

        # Evaluation may not wait behind training: it falls back to the CPU after max_wait_s.
        result = dg.materialize([contender_eval], instance=instance, resources={"gpu": gpu})
        assert result.success
        meta = metadata_of(instance, "contender_eval")
        assert meta["gpu/outcome"] == "FALLBACK_CPU"
        assert meta["gpu/device"] == "cpu"
        assert meta["gpu/reason"] == "timeout"
        assert meta["gpu/wait_ms"] >= 900
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any("falls back to the CPU" in m for m in logs)

        # Training waits for the device instead, and gets it once the holder is done.
        def release_once_queued() -> None:
            deadline = time.monotonic() + 120
            while not read_snapshot(state_dir, use_nvml=False)["queue"] and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)
            release.touch()

        threading.Thread(target=release_once_queued, daemon=True).start()
        result = dg.materialize([contender_training], instance=instance, resources={"gpu": gpu})
        assert result.success
        meta = metadata_of(instance, "contender_training")
        assert meta["gpu/outcome"] == "ACQUIRED"
        assert meta["gpu/device"] == "SIM-0"
        assert meta["gpu/wait_ms"] >= 400  # it queued until the holder released
        assert "gpu/hold_ms" in meta

        assert holder.wait(timeout=120) == 0
    finally:
        release.touch()
        if holder.poll() is None:
            holder.kill()
    held = metadata_of(instance, "held_training")
    assert held["gpu/outcome"] == "ACQUIRED"
    assert held["gpu/hold_ms"] >= 1000  # it held the device while the other two asked
    totals = gpu.snapshot()["totals"]
    assert (totals["acquired"], totals["fallback_cpu"]) == (2, 1)


def test_skipped_is_surfaced_to_the_asset(tmp_path: Path, mloc_home: Path) -> None:
    gpu = GpuArbiter(
        state_dir=str(tmp_path / "gpu"), simulated_devices=1, policies={"OPTIONAL": {"max_wait_s": 0.2}}
    )
    instance = dg.DagsterInstance.get()
    with gpu.arbiter.acquire("TRAIN", "someone else"):
        result = dg.materialize(
            [optional_report], instance=instance, resources={"gpu": gpu}, raise_on_error=False
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "optional report skipped" in failure.step_failure_data.error.message
    assert failure.step_failure_data.user_failure_data.metadata["gpu/outcome"].value == "SKIPPED"


def test_policies_from_run_config(tmp_path: Path, mloc_home: Path) -> None:
    run_config = {
        "resources": {
            "gpu": {
                "config": {
                    "state_dir": str(tmp_path / "gpu"),
                    "simulated_devices": 2,
                    "policies": {"TRAIN": {"priority": 90, "busy_policy": "FALLBACK_CPU"}},
                }
            }
        }
    }
    result = dg.materialize(
        [contender_training],
        instance=dg.DagsterInstance.get(),
        resources={"gpu": GpuArbiter()},
        run_config=run_config,
    )
    assert result.success
    policies = read_snapshot(tmp_path / "gpu")["policies"]  # as configured by the run's arbiter
    assert policies["TRAIN"]["priority"] == 90
    assert policies["TRAIN"]["busy_policy"] == "FALLBACK_CPU"


def test_watchdog_shows_in_the_step_log_and_metadata(tmp_path: Path, mloc_home: Path) -> None:
    gpu = GpuArbiter(state_dir=str(tmp_path / "gpu"), simulated_devices=1)
    instance = dg.DagsterInstance.get()
    result = dg.materialize([slow_merge], instance=instance, resources={"gpu": gpu})
    assert result.success
    assert metadata_of(instance, "slow_merge")["gpu/watchdog_exceeded"] is True
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("GPU watchdog" in m for m in logs)


def test_state_dir_defaults_to_mloc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOC_HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / "gpu"
    gpu = GpuArbiter(simulated_devices=1)
    with gpu.lease("TRAIN") as lease:
        assert lease.acquired
    assert (tmp_path / "home" / "gpu" / "arbiter.sqlite").exists()


if __name__ == "__main__":
    # The holder run of test_two_runs_contend_for_one_device, in its own process and on the same
    # instance (DAGSTER_HOME) as the test.
    state, ready_file, release_file = sys.argv[1:4]
    outcome = dg.materialize(
        [held_training],
        instance=dg.DagsterInstance.get(),
        resources={"gpu": GpuArbiter(state_dir=state, simulated_devices=1)},
        run_config={
            "ops": {"held_training": {"config": {"ready_file": ready_file, "release_file": release_file}}}
        },
    )
    sys.exit(0 if outcome.success else 1)


def test_mloc_gpu_status_shows_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from mloc_dagster.cli.gpu import gpu_app

    monkeypatch.setenv("MLOC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width
    runner = CliRunner()
    empty = runner.invoke(gpu_app, ["status"])
    assert empty.exit_code == 0 and "nothing has asked for a device" in empty.output

    gpu = GpuArbiter(simulated_devices=2)
    with gpu.lease("TRAIN", holder="run-1/adapter_checkpoint[yue]"):
        table = runner.invoke(gpu_app, ["status"])
        snap = json.loads(runner.invoke(gpu_app, ["status", "--json"]).output)
    assert table.exit_code == 0, table.output
    assert "run-1/adapter_checkpoint[yue]" in table.output
    assert [lease["holder"] for lease in snap["leases"]] == ["run-1/adapter_checkpoint[yue]"]
    assert [d["uuid"] for d in snap["devices"]] == ["SIM-0", "SIM-1"]
    assert snap["totals"]["acquired"] == 1
    metrics = runner.invoke(gpu_app, ["metrics"]).output
    assert 'gpu_arbiter_acquire_total{status="ACQUIRED",task_type="TRAIN"}' in metrics
    assert 'gpu_arbiter_device_leased{device="0",uuid="SIM-0"} 0.0' in metrics
