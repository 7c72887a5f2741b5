"""round_adapter on a real instance with adapters that were actually trained: slices that belong to
the round are screened and merged into the run's job ``round``; a slice of another run, round or
base model is refused with the reason and kept on disk; a round with nothing that belongs fails."""

from pathlib import Path

from mloc_dagster.core.state import PlannedSlice, StateStore, resolve_state_url
from mloc_dagster.definitions import defs
from tests.assets.conftest import DIALECT


def distributed_run(store, instance, run_id):
    from mloc_dagster.assets.lineage import require_metadata

    return store.create_run(run_id=run_id, dialect=DIALECT, kind="distributed", parallelism=2, round_samples=120,
                            dataset_version=require_metadata(instance, "dataset_version", DIALECT)["path"],
                            base_model_version=require_metadata(instance, "base_model")["path"], max_jobs=2)


def came_in(store, run, slices):
    store.place_slices(run.run_id, 0, [PlannedSlice(i, f"node-{i}", [[0, 60]], 1.0) for i in range(len(slices))])
    for i, result in enumerate(slices):
        store.record_slice_started(run.run_id, 0, i, dagster_run_id=f"d{i}")
        store.record_slice_finished(run.run_id, 0, i, "succeeded", checkpoint_path=result.path, sha256=result.sha256)


def merge_round(instance, run):
    return defs.resolve_job_def("round_merge_job").execute_in_process(
        partition_key=DIALECT, instance=instance, raise_on_error=False,
        run_config={"ops": {"round_adapter": {"config": {"run_id": run.run_id, "round_index": 0,
                                                         "reference_samples": 32}}}})


def test_slices_of_the_round_are_merged_and_strangers_refused(line, line_instance):
    store = StateStore(resolve_state_url())
    # The "good" adapter was trained as job 0 of a run named "good": as if it were slice 0 of round 0.
    run = distributed_run(store, line_instance, "good")
    came_in(store, run, [line.adapters["good"], line.adapters["weak"], line.adapters["other-base"]])
    result = merge_round(line_instance, run)
    assert result.success, result.all_events[-1]
    outcome = {s.node_id: s.outcome for s in store.round_slices(run.run_id, 0)}
    assert outcome["node-0"].startswith("accepted"), outcome
    assert outcome["node-1"] == "refused: adapter of run weak round 0, not good round 0"
    assert outcome["node-2"].startswith("refused: adapter of run other-base")
    assert Path(line.adapters["weak"].path).is_dir()  # refused, kept
    merged = store.get_job(run.run_id, 0)
    assert merged.status == "succeeded" and merged.checkpoint_path.endswith("round-0000/adapter")
    assert merged.metrics["accepted"] == 1 and 0 < merged.metrics["dev_cer"] < 1
    md = result.asset_materializations_for_node("round_adapter")[0].metadata
    assert "node-0" in md["screening"].value and md["round"].value == 0
    # Merging again (a re-execution) changes nothing.
    assert merge_round(line_instance, run).success and store.get_job(run.run_id, 0).adapter_sha256 == merged.adapter_sha256


def test_a_round_of_strangers_fails_with_the_reason(line, line_instance):
    store = StateStore(resolve_state_url())
    # Named like the run "other-base" was, so its adapter matches run and round and only the base
    # model tells it apart: the base-hash refusal is reached directly.
    run = distributed_run(store, line_instance, "other-base")
    came_in(store, run, [line.adapters["good"], line.adapters["other-base"]])
    result = merge_round(line_instance, run)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "no slice came in that belongs to the round" in failure.step_failure_data.error.message
    outcome = {s.node_id: s.outcome for s in store.round_slices(run.run_id, 0)}
    assert outcome["node-0"] == "refused: adapter of run good round 0, not other-base round 0"
    base = line.adapters["good"].base_model_hash
    assert outcome["node-1"] == (f"refused: trained on base model {line.adapters['other-base'].base_model_hash[:12]}, "
                                 f"the run's is {base[:12]}")
    assert store.get_job(run.run_id, 0) is None


def test_a_slice_that_starts_slowly_keeps_beating_and_is_not_replaced(mloc_home, tmp_path, monkeypatch):
    """A real run of a real TrainingStep: while its "start-up" (after the device lease, where the
    model loads and features are extracted) outlasts the silent-node limit, the real sensor, ticked
    mid-start-up, sees a live slice. On main the slice was only beaten by the training loop."""
    import threading
    import time

    import dagster as dg

    from mloc_dagster.assets.training_step import TrainingStep
    from mloc_dagster.partitions import dialect_partitions
    from mloc_dagster.resources.gpu import GpuArbiter
    from tests.sensors.conftest import tick

    monkeypatch.setattr("mloc_dagster.assets.training_step.KEEPALIVE_EVERY_S", 0.1)
    monkeypatch.setattr("mloc_dagster.sensors.rounds.SILENT_AFTER_S", 1.0)
    base = "ab" * 32
    store = StateStore(resolve_state_url())
    for node, speed in (("node-a", 20.0), ("node-b", 10.0)):  # node-b could take the slice over
        store.record_job_throughput(node, base, speed, source="calibrate")
    run = store.create_run(dialect=DIALECT, dataset_version="/d", base_model_version=f"/models/{base}",
                           kind="distributed", parallelism=1, round_samples=40, max_jobs=1)
    seen = {}

    @dg.asset(partitions_def=dialect_partitions)
    def slow_start(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> None:
        step = TrainingStep.open(context, store, store.get_run(run.run_id), 0, 0, tmp_path / "adapters")

        def start_up(lease, started_at):
            time.sleep(3 * 1.0)  # three times the silent limit, no training step yet
            seen["tick"] = tick(context.instance, store)[0]
            seen["slices"] = store.round_slices(run.run_id, 0)

        step.train(gpu, 60, start_up)

    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, [DIALECT])
        assert tick(instance, store)[0].run_requests  # round 0 placed: one slice, on node-a
        result = dg.materialize([slow_start], instance=instance, partition_key=DIALECT, resources={
            "gpu": GpuArbiter(simulated_devices=1, state_dir=str(tmp_path / "gpu"))})
    assert result.success
    assert [(s.node_id, s.status) for s in seen["slices"]] == [("node-a", "running")]  # not replaced
    assert seen["tick"].run_requests == []
    assert "mloc-keepalive" not in {t.name for t in threading.enumerate()}  # the beats end with the job
