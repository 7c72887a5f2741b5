"""A distributed run end to end through the real `dagster-daemon` on CPU: 3 rounds on 4 simulated
nodes of different speeds (one machine; ``MLOC_SIMULATED_NODE_THROTTLE`` slows two of them down),
slices placed by measured throughput, rounds screened and merged, and a candidate gated. One node
is below the trust bar: no trusted adapter and no stable candidate holds its slices, its
reputation moves once per round. Slow by nature."""

import json
from pathlib import Path

import dagster as dg
import pytest

from mloc_dagster.core.pool.rounds import base_model_hash
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.assets.conftest import DIALECT
from tests.daemon import Daemon, wait_for

SPEEDS = {"sim-a": 40.0, "sim-b": 40.0, "sim-c": 20.0, "sim-d": 10.0}  # as calibrated
THROTTLE = {"sim-c": 2.0, "sim-d": 4.0}  # what makes them that much slower here
UNTRUSTED = "sim-c"  # below the trust bar (0.7) from the start


@pytest.mark.slow
def test_three_rounds_on_four_simulated_nodes(line_instance, mloc_home):
    instance = line_instance
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=3, candidate_every=3, timebox_s=120,
                    hparams={"batch_size": 8, "lr": 3e-3}, kind="distributed", parallelism=4, round_samples=96))
    base = base_model_hash(run.base_model_version)
    for node, speed in SPEEDS.items():
        store.record_job_throughput(node, base, speed, source="calibrate")
    store.set_node_reputation(UNTRUSTED, 0.5)
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
    # Each node's figure was measured by its slices, not left at calibration: an average of the
    # calibrated figure and its slices' measurements (how much slower a throttled node is depends on
    # what else the machine runs: bench/pool.py measures it, a test only checks where figures come from).
    measured = {n: [s.metrics["samples_per_s"] for k in range(3) for s in store.round_slices(run.run_id, k)
                    if s.node_id == n and s.metrics] for n in SPEEDS}
    for n, speed in SPEEDS.items():
        figure = store.get_node(n).throughput[base]
        assert figure["source"] == "job" and figure["jobs"] >= 1 and measured[n], (n, figure, measured)
        assert min(measured[n] + [speed]) - 1e-3 <= figure["samples_per_s"] <= max(measured[n] + [speed]) + 1e-3
    merges = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("round_adapter")),
                                             limit=10).records
    assert len(merges) == 3 and all("screening" in m.asset_materialization.metadata for m in merges)
    slices = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id}))
    assert {r.dagster_run.tags["mloc/node"] for r in slices} == set(SPEEDS)
    assert {r.dagster_run.tags.get("mloc/round") for r in slices} == {"0", "1", "2"}

    # Trust: an adapter that holds a node below the bar is never trusted, and round 0 (every other
    # node trusted and calibrated) is built without it. Later rounds may lose every trusted slice to
    # screening on this noisy CPU run; then the run goes on from all of them, marked untrusted.
    rounds = [store.round_merge(run.run_id, k) for k in range(3)]
    assert all(m.nodes and (UNTRUSTED not in m.nodes or not m.trusted) for m in rounds), \
        [(m.nodes, m.trusted) for m in rounds]
    assert rounds[0].trusted and UNTRUSTED not in rounds[0].nodes, rounds[0].nodes
    merged_in = [m for m in rounds if UNTRUSTED in (m.experimental_nodes or {}) or UNTRUSTED in m.nodes]
    assert merged_in, "the untrusted node's slices were never merged"
    assert all(UNTRUSTED in m.reputation for m in merged_in)  # moved once per round it was merged in
    shown = [m.asset_materialization.metadata["below_trust_bar"].value for m in merges]
    assert sum(UNTRUSTED in b for b in shown) >= len(merged_in)
    after_rounds = next(m.reputation[UNTRUSTED]["after"] for m in reversed(rounds) if UNTRUSTED in m.reputation)

    # The candidate after round 3 merged the last round's adapter: stable only if that adapter is
    # trusted, and then without the untrusted node.
    candidates = [c for c in store.list_candidates(DIALECT, limit=None) if not c.details.get("companion_of")]
    assert len(candidates) == 1 and [(s.run_id, s.job_index) for s in candidates[0].sources] == [(run.run_id, 2)]
    stable = candidates[0]
    assert stable.trusted == rounds[2].trusted
    assert not stable.trusted or UNTRUSTED not in store.adapter_nodes(stable.sources[0])
    gate = instance.fetch_materializations(dg.AssetKey("gate_report"), limit=1).records[0].asset_materialization.metadata
    assert gate["candidate_id"].value == stable.candidate_id
    # Default thresholds: the tiny model cannot reach CER 0.15, so the gate fails on that; it moves
    # the nodes inside the candidate only when the candidate did harm.
    report = json.loads(Path(stable.gate_report_path).read_text())
    assert stable.gate_decision == report["decision"] == "failed"
    assert any(r.startswith("cer_gate") for r in report["reasons"]), report["reasons"]
    assert set(gate["reputation_after"].value) == (set(rounds[2].nodes) if gate["harm"].value else set())
    # The untrusted node's last move came from its last round, or from the experimental companion's gate.
    companion_moves = gate["experimental_reputation_after"].value if "experimental_reputation_after" in gate else {}
    moved = gate["reputation_after"].value | companion_moves
    assert store.node_reputation(UNTRUSTED) == pytest.approx(moved.get(UNTRUSTED, after_rounds))
