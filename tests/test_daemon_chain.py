"""The training chain driven by the real `dagster-daemon` (sensors, run queue, run launcher):
a 2-job run with a tiny budget; each job runs exactly once, in order; the candidate and its gate
follow. Slow by nature (every Dagster run is a fresh Python process): ~1-2 minutes."""

import dagster as dg
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.daemon import Daemon, wait_for


@pytest.fixture()
def daemon(registered_base, mloc_home):
    d = Daemon(mloc_home)
    d.start()
    yield d
    d.stop()


@pytest.mark.slow
def test_two_job_chain_with_the_real_daemon(registered_base, daemon, mloc_home):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, candidate_every=2, timebox_s=30,
                    hparams={"max_steps": 3, "batch_size": 4}))

    def candidate_finished():  # the run completes once its last candidate has its verdict
        records = instance.get_run_records(dg.RunsFilter(job_name="candidate_job", tags={"mloc/run_id": run.run_id}))
        done = records and records[0].dagster_run.is_finished and store.get_run(run.run_id).status != "active"
        return records if done else None
    [candidate_run] = wait_for(candidate_finished, 420, "the chain and its candidate", daemon)

    train_runs = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id}),
                                          order_by="create_timestamp", ascending=True)
    assert [r.dagster_run.tags["mloc/job_index"] for r in train_runs] == ["0", "1"]  # once each, in order
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in train_runs)
    assert train_runs[0].end_time <= train_runs[1].start_time + 5  # job 1 ran after job 0 (pool gpu = 1)
    assert store.get_run(run.run_id).status == "completed"
    assert [j.status for j in store.jobs_for_run(run.run_id)] == ["succeeded", "succeeded"]
    gate = instance.get_latest_materialization_event(dg.AssetKey("gate_report"))
    assert gate is not None and gate.asset_materialization.partition == "en-gb-scotland"
    (candidate,) = [c for c in store.list_candidates("en-gb-scotland") if c.training_run_id == run.run_id]
    metadata = gate.asset_materialization.metadata
    assert metadata["candidate_id"].value == candidate.candidate_id
    # An untrained tiny base after 3 steps cannot reach the default CER limit (0.15): the gate decides
    # "failed", its blocking checks fail the candidate job, and that verdict (not a crash) lets the
    # run complete above instead of pausing it.
    assert metadata["cer_candidate"].value > 0.15 and metadata["decision"].value == "failed"
    assert candidate.gate_decision == "failed" and candidate_run.dagster_run.status == dg.DagsterRunStatus.FAILURE
