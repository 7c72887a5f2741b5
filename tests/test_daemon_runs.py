"""Several runs on one dialect, a canceled job and a long wait for the device, driven by the real
`dagster-daemon` (sensors, run queue, run retries, run monitoring). Slow by nature."""

import threading

import dagster as dg
import pytest

from mloc_dagster.core.arbiter.acquire import Arbiter
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, resume_run, start_run
from tests.daemon import Daemon, wait_for

DIALECT = "en-gb-scotland"
TINY = {"max_steps": 3, "batch_size": 4}


def runs_of(instance, job_name, run_id=None):
    tags = {"mloc/run_id": run_id} if run_id else None
    return instance.get_run_records(dg.RunsFilter(job_name=job_name, tags=tags), order_by="create_timestamp",
                                    ascending=True)


def all_finished(instance):
    in_flight = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                 dg.DagsterRunStatus.STARTED]
    return not instance.get_run_records(dg.RunsFilter(statuses=in_flight), limit=1)


@pytest.fixture()
def daemon_env():
    return {}


@pytest.fixture()
def daemon(registered_base, mloc_home, daemon_env):
    d = Daemon(mloc_home, **daemon_env)
    d.start()
    yield d
    d.stop()


@pytest.mark.slow
def test_two_runs_on_one_dialect_share_candidates_exactly(registered_base, daemon):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    runs = [start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=1, timebox_s=60, hparams=TINY))
            for _ in range(2)]

    def done():
        return all(store.get_run(r.run_id).status == "completed" for r in runs) and all_finished(instance)
    wait_for(done, 600, "both runs and their candidates", daemon)

    adapters = {(j.run_id, j.job_index) for r in runs for j in store.jobs_for_run(r.run_id) if j.status == "succeeded"}
    assert len(adapters) == 4
    candidates = store.list_candidates(DIALECT, limit=None)
    claimed = [(j.run_id, j.job_index) for r in runs for j in store.jobs_for_run(r.run_id) if j.candidate_id]
    assert sorted(claimed) == sorted(adapters)  # every adapter in exactly one candidate (one column, one value)
    for c in candidates:
        assert {s.run_id for s in c.sources} <= {r.run_id for r in runs}
    gates = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("gate_report")),
                                            limit=100).records
    gated = [g.asset_materialization.metadata["candidate_id"].value for g in gates]
    assert sorted(gated) == sorted(c.candidate_id for c in candidates)  # one report per candidate, its own
    # An untrained tiny base after 3 steps cannot reach the default CER limit (0.15): every gate
    # decides "failed" (a verdict, so neither run was paused for it) and nothing is promoted.
    assert all(g.asset_materialization.metadata["cer_candidate"].value > 0.15 for g in gates)
    assert [c.gate_decision for c in candidates] == ["failed"] * len(candidates)
    assert store.list_promotions(DIALECT, limit=None) == []
    for record in runs_of(instance, "candidate_job"):
        assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS or \
            store.candidate_of_dagster_run(record.dagster_run.run_id) is not None


@pytest.mark.slow
def test_a_job_terminated_through_dagster_pauses_its_run_and_resume_finishes_it(registered_base, daemon):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=40,
                    hparams={"batch_size": 4, "checkpoint_every_s": 5.0}))

    def training():
        job = store.get_job(run.run_id, 0)
        return job if job is not None and job.status == "running" and (job.progress or {}).get("step") else None
    job = wait_for(training, 300, "job 0 to train", daemon)
    assert instance.run_launcher.terminate(job.dagster_run_id)  # what the UI's Terminate does

    def paused():
        r = store.get_run(run.run_id)
        return r if r.status == "paused" else None
    reason = wait_for(paused, 120, "the run to be paused", daemon).status_reason
    assert "was canceled" in reason and "mloc run resume" in reason
    assert resume_run(store, run.run_id)

    def completed():
        return store.get_run(run.run_id).status == "completed" and all_finished(instance)
    wait_for(completed, 300, "the resumed run to complete", daemon)
    trains = runs_of(instance, "train_adapter_job", run.run_id)
    assert [r.dagster_run.status for r in trains][-1] == dg.DagsterRunStatus.SUCCESS
    assert store.get_job(run.run_id, 0).status == "succeeded"


@pytest.mark.slow
# A 40 s margin instead of 120 s keeps the test short; it still covers a run worker's start-up on a
# busy machine (the step sets the backstop only once it runs).
@pytest.mark.parametrize("daemon_env", [{"MLOC_TIMEBOX_MARGIN_S": "40"}])
def test_a_long_wait_for_the_device_inside_the_step_does_not_kill_the_job(registered_base, daemon, mloc_home):
    """The pool admits the step, but the node's only device is held elsewhere for longer than the
    backstop's margin: the job waits, then trains its whole timebox, and run monitoring lets it."""
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    arbiter = Arbiter(mloc_home / "gpu", cpu_slots=1)
    holder = arbiter.acquire("TRAIN", holder="another process")
    assert holder.acquired
    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=20, hparams={"batch_size": 4}))
    started = wait_for(lambda: store.get_job(run.run_id, 0) if (store.get_job(run.run_id, 0) or 0) and
                       store.get_job(run.run_id, 0).status == "running" else None, 300, "job 0 to start", daemon)
    assert started
    release = threading.Timer(75.0, holder.release)  # 75 s > timebox 20 s + margin 40 s
    release.start()

    def finished():
        job = store.get_job(run.run_id, 0)
        return job if job.status in ("succeeded", "failed") and all_finished(instance) else None
    job = wait_for(finished, 300, "job 0 to finish", daemon)
    release.join()
    arbiter.close()
    assert job.status == "succeeded", job.error
    records = runs_of(instance, "train_adapter_job", run.run_id)
    assert [r.dagster_run.status for r in records] == [dg.DagsterRunStatus.SUCCESS]  # not killed, not retried
    md = instance.get_latest_materialization_event(dg.AssetKey("adapter_checkpoint")).asset_materialization.metadata
    assert md["gpu/wait_ms"].value >= 70000 and md["stop_reason"].value == "timebox"
    assert md["train_seconds"].value > 10  # the full timebox minus start-up, evaluation and save
