"""round_adapter on a real instance with adapters that were actually trained: slices that belong to
the round are screened and merged into the run's job ``round``; a slice of another run, round or
base model is refused with the reason and kept on disk; a round with nothing that belongs fails.
A slice of a node below the trust bar reaches only the round's experimental sibling, and the
merge moves each node's reputation once even when it is retried."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.core.state.rounds import PlannedSlice
from mloc_dagster.definitions import defs
from tests.assets.conftest import DIALECT

LENIENT = {"thresholds": {DIALECT: {"max_cer": 0.9, "max_wer": 1.0, "max_base_regression_rel": 0.5}},
           "bootstrap_samples": 500}


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

    from mloc_dagster.assets.training.step import TrainingStep
    from mloc_dagster.partitions import dialect_partitions
    from mloc_dagster.resources.gpu import GpuArbiter
    from tests.sensors.conftest import tick

    monkeypatch.setattr("mloc_dagster.assets.training.step.KEEPALIVE_EVERY_S", 0.1)
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


def scaled_copy(src: str, out: Path, factor: float) -> SimpleNamespace:
    """Another honest slice of the same round: the adapter's update scaled (same direction)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, weights)
    return SimpleNamespace(path=str(out), sha256=None)


def test_a_node_below_the_trust_bar_feeds_only_the_experimental_sibling_and_moves_once(line, line_instance,
                                                                                      tmp_path):
    from mloc_dagster.core.state.schema import training_jobs

    store = StateStore(resolve_state_url())
    run = distributed_run(store, line_instance, "good")
    came_in(store, run, [line.adapters["good"], scaled_copy(line.adapters["good"].path, tmp_path / "s1", 0.5)])
    store.set_node_reputation("node-1", 0.5)
    result = merge_round(line_instance, run)
    assert result.success, result.all_events[-1]
    merge = store.round_merge(run.run_id, 0)
    # The round's adapter (what the run continues from and a stable candidate merges) holds node-0 only.
    assert merge.nodes == {"node-0": 60.0} and merge.trusted
    assert merge.experimental_nodes == {"node-0": 60.0, "node-1": 60.0}
    assert store.get_job(run.run_id, 0).checkpoint_path.endswith("round-0000/adapter")
    assert Path(merge.experimental_path).is_dir() and merge.experimental_sha256 != store.get_job(run.run_id, 0).adapter_sha256
    outcome = {s.node_id: s.outcome for s in store.round_slices(run.run_id, 0)}
    assert outcome["node-0"].startswith("accepted") and "experimental only" not in outcome["node-0"]
    assert outcome["node-1"].startswith("accepted") and "experimental only" in outcome["node-1"], outcome
    md = result.asset_materializations_for_node("round_adapter")[0].metadata
    assert md["below_trust_bar"].value == {"node-1": 0.5} and md["nodes"].value == {"node-0": 60.0}
    assert md["experimental_only"].value == 1
    moved = {n: m["after"] for n, m in merge.reputation.items()}
    assert set(moved) == {"node-0", "node-1"} and moved["node-1"] == pytest.approx(store.node_reputation("node-1"))

    # The merge's worker died after recording the merge, before recording the round's job: the retry
    # merges again and records the job, but moves nobody's reputation a second time.
    with store._write() as conn:
        conn.execute(training_jobs.delete().where(training_jobs.c.run_id == run.run_id))
    assert merge_round(line_instance, run).success
    assert store.get_job(run.run_id, 0).status == "succeeded"
    assert {n: store.node_reputation(n) for n in moved} == pytest.approx(moved)

    # The run's candidate is stable and built without node-1's slice; its experimental companion
    # merges the round's sibling. The gate moves the nodes inside each candidate.
    result = defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=line_instance, raise_on_error=False, tags={"mloc/run_id": run.run_id},
        run_config={"ops": {"gate_report": {"config": LENIENT}}})
    merged, gate = (result.asset_materializations_for_node(n)[0].metadata for n in ("merged_candidate", "gate_report"))
    stable = store.get_candidate(merged["candidate_id"].value)
    assert stable.trusted and [s.path for s in stable.sources] == [store.get_job(run.run_id, 0).checkpoint_path]
    assert merged["stable_nodes"].value == {"node-0": 1.0} and merged["experimental_only_nodes"].value == ["node-1"]
    companion = store.get_candidate(merged["experimental_candidate"].value)
    assert [s.path for s in companion.sources] == [merge.experimental_path] and not companion.trusted
    assert gate["decision"].value == "passed" and set(gate["reputation_after"].value) == {"node-0"}
    assert "node-0" not in gate["experimental_reputation_after"].value
    assert store.get_job(run.run_id, 0).candidate_id == stable.candidate_id
