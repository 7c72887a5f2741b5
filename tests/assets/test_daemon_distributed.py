"""A distributed run end to end through the real `dagster-daemon` on CPU: 3 rounds on 4 simulated
nodes of different speeds (one machine; ``MLOC_SIMULATED_NODE_THROTTLE`` slows two of them down),
slices placed by measured throughput, rounds screened and merged, and a candidate gated.
Slow by nature."""

import json

import dagster as dg
import pytest

from mloc_dagster.core.rounds import base_model_hash
from mloc_dagster.core.state import StateStore, resolve_state_url
from mloc_dagster.training_runs import start_run
from tests.assets.conftest import DIALECT
from tests.daemon import Daemon, wait_for

SPEEDS = {"sim-a": 40.0, "sim-b": 40.0, "sim-c": 20.0, "sim-d": 10.0}  # as calibrated
THROTTLE = {"sim-c": 2.0, "sim-d": 4.0}  # what makes them that much slower here


@pytest.mark.slow
def test_three_rounds_on_four_simulated_nodes(line_instance, mloc_home):
    instance = line_instance
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, DIALECT, jobs=3, candidate_every=3, timebox_s=120,
                    hparams={"batch_size": 8, "lr": 3e-3}, kind="distributed", parallelism=4, round_samples=96)
    base = base_model_hash(run.base_model_version)
    for node, speed in SPEEDS.items():
        store.record_job_throughput(node, base, speed, source="calibrate")
    daemon = Daemon(mloc_home, MLOC_SIMULATED_NODE_THROTTLE=json.dumps(THROTTLE), MLOC_NODE_TTL_S="3600")
    daemon.start()
    try:
        def finished():
            r = store.get_run(run.run_id)
            if r.status in ("failed", "paused", "cancelled"):
                raise AssertionError(f"run {r.status}: {r.status_reason}")
            in_flight = instance.get_run_records(dg.RunsFilter(statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]), limit=1)
            return r.status == "completed" and not in_flight

        def diagnose():
            return json.dumps([[(s.slice_index, s.node_id, s.status, s.outcome, s.error)
                                for s in store.round_slices(run.run_id, k)] for k in range(3)], default=str)
        wait_for(finished, 1500, "the distributed run to complete", daemon, diagnose)
    finally:
        daemon.stop()

    first = store.round_slices(run.run_id, 0)
    assert [s.node_id for s in first] == sorted(SPEEDS)  # every node took a slice...
    samples = {s.node_id: s.samples for s in first}
    assert abs(samples["sim-a"] - samples["sim-b"]) <= 1  # ...sized by speed (exact DP: ties within a sample)
    assert min(samples["sim-a"], samples["sim-b"]) > samples["sim-c"] > samples["sim-d"]
    assert sum(samples.values()) == 96
    for k in range(3):
        merged = store.get_job(run.run_id, k)
        assert merged.status == "succeeded" and merged.checkpoint_path.endswith(f"round-{k:04d}/adapter")
        verdicts = [s.outcome or "" for s in store.round_slices(run.run_id, k) if s.status == "succeeded"]
        assert verdicts and all(v.startswith(("accepted", "excluded", "refused")) for v in verdicts), verdicts
        assert any(v.startswith("accepted") for v in verdicts), verdicts
    # Each round continued the previous round's adapter; the throttled node measured slower.
    assert store.get_node("sim-d").samples_per_s(base) < store.get_node("sim-a").samples_per_s(base)
    merges = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("round_adapter")),
                                             limit=10).records
    assert len(merges) == 3 and all("screening" in m.asset_materialization.metadata for m in merges)
    slices = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id}))
    assert {r.dagster_run.tags["mloc/node"] for r in slices} == set(SPEEDS)
    assert {r.dagster_run.tags.get("mloc/round") for r in slices} == {"0", "1", "2"}
    # The candidate after round 3 merged the last round's adapter and was gated.
    candidates = store.list_candidates(DIALECT, limit=None)
    assert len(candidates) == 1 and [(s.run_id, s.job_index) for s in candidates[0].sources] == [(run.run_id, 2)]
    assert candidates[0].gate_decision in ("passed", "failed")
