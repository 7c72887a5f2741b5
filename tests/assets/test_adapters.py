"""adapter_checkpoint materialized through Dagster on a real instance: twice for one training run,
the second job resuming from the first; metadata the UI plots; the state store kept in step."""

import json
from pathlib import Path

import dagster as dg

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs

DIALECT = "en-gb-scotland"


def train(instance, run_id, job_index, **extra):
    config = {"run_id": run_id, "job_index": job_index, "timebox_s": 60, "max_steps": 6, "batch_size": 4, **extra}
    return defs.resolve_job_def("train_adapter_job").execute_in_process(
        partition_key=DIALECT, instance=instance, raise_on_error=False,
        run_config={"ops": {"adapter_checkpoint": {"config": config}}},
        tags={"mloc/run_id": run_id, "mloc/job_index": str(job_index)})


def test_two_jobs_of_one_run_resume_and_record(registered_base):
    instance, _ = registered_base
    first = train(instance, "tr-test000001", 0)
    assert first.success, first.get_step_failure_events()
    md0 = {k: v.value for k, v in first.asset_materializations_for_node("adapter_checkpoint")[0].metadata.items()}
    for key in ("steps", "samples", "train_loss", "dev_cer", "samples_per_s", "train_seconds",
                "overhead_seconds", "peak_rss_mb", "job_index"):
        assert isinstance(md0[key], int | float), key
    assert md0["steps"] == 6 and md0["run_id"] == "tr-test000001" and md0["node_id"]
    assert md0["node_samples_per_s"] > 0  # the node registry learned this node's throughput
    assert md0["gpu/outcome"] == "ACQUIRED" or md0["gpu/outcome"] == "acquired"
    ckpt0 = Path(md0["path"])
    assert (ckpt0 / "adapter_model.safetensors").is_file() and (ckpt0 / "adapter_config.json").is_file()
    assert not list(ckpt0.rglob("*.bin")) and not list(ckpt0.rglob("*.pt"))

    second = train(instance, "tr-test000001", 1)
    assert second.success
    md1 = {k: v.value for k, v in second.asset_materializations_for_node("adapter_checkpoint")[0].metadata.items()}
    assert md1["total_steps"] == 12  # the run's step count continues from job 0
    assert md1["resumed_kind"] == "resume_from" and md1["resumed_from"] == md0["path"]

    store = StateStore(resolve_state_url())
    run = store.get_run("tr-test000001")
    assert run.last_finished_job == 1
    jobs = store.jobs_for_run(run.run_id)
    assert [j.status for j in jobs] == ["succeeded", "succeeded"]
    assert jobs[1].checkpoint_path == md1["path"] and jobs[1].adapter_sha256 == md1["sha256"]
    # the UI's lineage: the materialization carries the adapter's hash as its data version
    event = instance.get_latest_materialization_event(dg.AssetKey("adapter_checkpoint"))
    assert event.asset_materialization.tags["dagster/data_version"] == md1["sha256"]


def test_job_without_previous_checkpoint_is_refused(registered_base):
    instance, _ = registered_base
    result = train(instance, "tr-test000002", 3)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "needs job 2's checkpoint" in message



def test_unwritable_artifact_dir_fails_clearly_and_keeps_the_previous_checkpoint(registered_base, mloc_home):
    instance, _ = registered_base
    assert train(instance, "tr-test000003", 0).success
    job0 = mloc_home / "adapters" / DIALECT / "tr-test000003" / "job-0000"
    before = {p.name: p.read_bytes() for p in job0.iterdir()}
    # Root ignores permission bits, so block the directory itself: job 1's dir path is a file.
    (job0.parent / "job-0001").write_text("not a directory")
    (job0.parent / "job-0001.partial").write_text("not a directory")
    result = train(instance, "tr-test000003", 1)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "cannot write the checkpoint of job 1" in message and f"intact: {job0}" in message
    assert {p.name: p.read_bytes() for p in job0.iterdir()} == before
    store = StateStore(resolve_state_url())
    assert store.get_job("tr-test000003", 1).status == "failed"
    assert store.get_run("tr-test000003").last_finished_job == 0


def test_config_defaults_match_the_core():
    from dataclasses import fields

    from mloc_dagster.assets.training.hparams import AdapterJobConfig
    from mloc_dagster.core.training.spec import AdapterHParams

    config = AdapterJobConfig(run_id="x")
    for f in fields(AdapterHParams):
        if f.name != "target_modules":
            assert getattr(config, f.name, f.default) == f.default, f.name


def failure_message(result):
    return result.get_step_failure_events()[0].step_failure_data.error.message


def test_a_job_of_a_paused_or_cancelled_run_refuses_to_train(registered_base):
    instance, _ = registered_base
    assert train(instance, "tr-test000004", 0).success
    store = StateStore(resolve_state_url())
    store.record_job_queued("tr-test000004", 1)  # requested by the chain, then the run is paused
    store.transition_run("tr-test000004", "active", "paused", "paused by user")
    refused = train(instance, "tr-test000004", 1)
    assert not refused.success
    assert "tr-test000004 is paused (paused by user): job 1 does not start" in failure_message(refused)
    tags = instance.get_run_by_id(refused.run_id).tags
    # Dagster must not retry it (resume requests it again), and the chain knows why it failed.
    assert tags["dagster/retry_on_asset_or_op_failure"] == "false" and tags["mloc/refused"] == "paused"
    assert store.get_job("tr-test000004", 1).status == "failed"
    store.transition_run("tr-test000004", "paused", "cancelled", "cancelled by user")
    assert "is cancelled" in failure_message(train(instance, "tr-test000004", 1))
    assert not (Path(store.get_job("tr-test000004", 0).checkpoint_path).parent / "job-0001").exists()


def test_a_job_with_no_training_time_fails_instead_of_succeeding_with_zero_steps(registered_base, monkeypatch):
    """Start-up after the device grant (loading the base model) takes longer than the whole
    timebox -- simulated with a slow load, as from a network disk: not one step fits."""
    import time

    import mloc_dagster.core.training.asr as training

    real_load = training.load_base_model

    def slow_load(*args, **kwargs):
        time.sleep(1.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(training, "load_base_model", slow_load)
    instance, _ = registered_base
    result = train(instance, "tr-test000005", 0, timebox_s=1, max_steps=0)
    assert not result.success
    message = failure_message(result)
    assert "trained 0 steps" in message and "timebox" in message
    store = StateStore(resolve_state_url())
    job = store.get_job("tr-test000005", 0)
    assert job.status == "failed" and job.checkpoint_path is None
    assert store.get_run("tr-test000005").last_finished_job is None


def test_the_timebox_starts_when_the_device_is_granted(registered_base, mloc_home):
    """Another holder keeps the only device for a while: the job waits inside its step, then still
    gets its whole timebox, and the run's max_runtime backstop is moved by the wait."""
    import threading

    from mloc_dagster.core.arbiter.acquire import Arbiter

    instance, _ = registered_base
    arbiter = Arbiter(mloc_home / "gpu", cpu_slots=1)
    holder = arbiter.acquire("TRAIN", holder="someone-else")
    assert holder.acquired
    threading.Timer(8.0, holder.release).start()
    result = train(instance, "tr-test000006", 0, timebox_s=20, max_steps=0)
    assert result.success, failure_message(result)
    md = {k: v.value for k, v in result.asset_materializations_for_node("adapter_checkpoint")[0].metadata.items()}
    assert md["gpu/wait_ms"] >= 5000
    assert md["stop_reason"] == "timebox" and md["wall_seconds"] <= 20
    assert md["train_seconds"] > 8  # the wait did not eat the timebox
    max_runtime = int(instance.get_run_by_id(result.run_id).tags["dagster/max_runtime"])
    assert max_runtime >= md["gpu/wait_ms"] / 1000 + 20 + 120
    arbiter.close()


def test_launchpad_takes_typed_hparams_and_rejects_unknown_ones(registered_base):
    instance, _ = registered_base

    def launch(hparams):
        return defs.resolve_job_def("start_training_run").execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"ops": {"create_training_run": {"config": {"dialect": DIALECT, "jobs": 1,
                                                                   "timebox_s": 60, "hparams": hparams}}}})

    ok = launch({"r": 8, "lr": 0.002, "target_modules": ["head"], "max_steps": 2, "batch_size": 4})
    assert ok.success
    store = StateStore(resolve_state_url())
    run = store.list_runs(limit=1)[0]
    assert run.hparams["r"] == 8 and isinstance(run.hparams["r"], int)
    from mloc_dagster.runs.requests import train_run_request

    config = train_run_request(run, 0).run_config["ops"]["adapter_checkpoint"]["config"]
    trained = defs.resolve_job_def("train_adapter_job").execute_in_process(
        partition_key=DIALECT, instance=instance, run_config={"ops": {"adapter_checkpoint": {"config": config}}})
    assert trained.success  # the training job accepts what the launchpad stored

    rejected = launch({"lora_r": 8})
    assert not rejected.success
    message = failure_message(rejected)
    assert "unknown hparam(s) lora_r; allowed: alpha, batch_size" in message and "target_modules" in message
    assert "ill-typed hparam(s): r: " in failure_message(launch({"r": 8.5}))


def test_heartbeat_database_errors_do_not_stop_training(registered_base, monkeypatch):
    """The state store's database drops out during the job (simulated: heartbeat writes raise the
    error a lost connection raises): the job logs, retries, keeps training and succeeds."""
    import sqlalchemy as sa

    instance, _ = registered_base
    failures = []

    def unreachable(self, run_id, job_index, progress=None):
        failures.append(1)
        raise sa.exc.OperationalError("UPDATE training_jobs", {}, Exception("could not connect to server"))

    monkeypatch.setattr(StateStore, "heartbeat", unreachable)
    result = train(instance, "tr-test000007", 0, max_steps=0, timebox_s=25)
    assert result.success, failure_message(result)
    assert len(failures) >= 4  # at least one heartbeat's worth of retries
    md = {k: v.value for k, v in result.asset_materializations_for_node("adapter_checkpoint")[0].metadata.items()}
    assert md["stop_reason"] == "timebox" and md["steps"] > 0
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("state store error (attempt 1/4)" in m for m in logs)
    assert any("heartbeat not recorded" in m for m in logs)


def test_a_run_pins_its_rehearsal_dataset_at_start(registered_base):
    """A resumed job must see the rehearsal rows its checkpoint was trained on: the run pins the base
    dialect's dataset version when it starts, and jobs read that, not whatever is latest."""
    from dataclasses import replace

    from mloc_dagster.assets.lineage import require_metadata
    from mloc_dagster.assets.training.adapters import run_rehearsal
    from mloc_dagster.runs.service import StartRequest, start_run

    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    latest_en_us = require_metadata(instance, "dataset_version", "en-us")["path"]
    run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=1))
    assert run.rehearsal_dataset == latest_en_us == store.get_run(run.run_id).rehearsal_dataset
    assert run_rehearsal(instance, replace(run, rehearsal_dataset="/pinned/en-us/v1")) == "/pinned/en-us/v1"
    assert start_run(instance, store, StartRequest("en-us", jobs=1)).rehearsal_dataset == ""  # the base dialect: none
    assert run_rehearsal(instance, replace(run, rehearsal_dataset="")) is None
    assert run_rehearsal(instance, replace(run, rehearsal_dataset=None)) == latest_en_us  # a run from before pinning


def test_a_pooled_slice_skips_the_warm_up_and_a_first_round_on_one_node_keeps_it(registered_base):
    """A pooled slice continues the round's start adapter: no LR warm-up. A run's first round on one
    node (``--first-round-on-one-node``) is that node's first job of a fresh LoRA: it warms up like
    a single run's first job. Read from what the real job trained with (its train_state.json)."""
    from mloc_dagster.assets.lineage import require_metadata
    from mloc_dagster.core.adapters.format import TRAIN_STATE_JSON
    from mloc_dagster.core.state.rounds import PlannedSlice

    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    trained_with = {}
    for alone in (True, False):
        run = store.create_run(dialect=DIALECT, kind="distributed", parallelism=2, round_samples=16, max_jobs=2,
                               first_round_on_one_node=alone,
                               dataset_version=require_metadata(instance, "dataset_version", DIALECT)["path"],
                               base_model_version=require_metadata(instance, "base_model")["path"])
        store.place_slices(run.run_id, 0, [PlannedSlice(0, "node-a", [[0, 16]], 1.0)])
        result = train(instance, run.run_id, 0, slice_index=0, warmup_steps=3, max_steps=2)
        assert result.success, result.get_step_failure_events()
        path = result.asset_materializations_for_node("adapter_checkpoint")[0].metadata["path"].value
        trained_with[alone] = json.loads((Path(path) / TRAIN_STATE_JSON).read_text())["hparams"]["warmup_steps"]
    assert trained_with == {True: 3, False: 0}
