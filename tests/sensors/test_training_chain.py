"""training_chain_sensor decisions on a real instance with real run records and a real state store."""

import json
import uuid

import dagster as dg
import pytest

from mloc_dagster.assets.tracks import TRACKS
from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.requests import CANDIDATE_JOB
from mloc_dagster.runs.service import cancel_run, pause_run, reactivate_run, resume_run
from tests.sensors.conftest import tick

DIALECT = "en-gb-scotland"
TTS_TRAIN_JOB, TTS_CANDIDATE_JOB = TRACKS["tts"].train_job, TRACKS["tts"].candidate_job


@pytest.fixture()
def store(tmp_path):
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


@pytest.fixture()
def instance(mloc_home):
    with dg.instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 2}}) as inst:
        yield inst



def keys(result):
    return [(r.job_name, r.run_key) for r in result.run_requests]


def new_run(store, jobs=3, every=2):
    return store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                            hparams={"lr": 0.001, "r": 8, "target_modules": ["head"]}, timebox_s=60, max_jobs=jobs,
                            candidate_every=every)


def succeed(store, run, i):
    store.record_job_started(run.run_id, i, dagster_run_id=f"d{i}")
    store.record_job_finished(run.run_id, i, "succeeded", checkpoint_path=f"/ckpt/{i}", sha256="x")


def failed_dagster_run(instance, run, i, retry_number, parent=None):
    """A failed training job; ``parent``: the attempt it retries (Dagster counts a run group)."""
    dagster_run = instance.add_run(dg.DagsterRun(
        job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
        parent_run_id=parent.run_id if parent else None,
        root_run_id=(parent.root_run_id or parent.run_id) if parent else None,
        tags={"mloc/run_id": run.run_id, "mloc/job_index": str(i), "dagster/retry_number": str(retry_number),
              **({"dagster/parent_run_id": parent.run_id,
                  "dagster/root_run_id": parent.root_run_id or parent.run_id} if parent else {})}))
    instance.report_run_failed(dagster_run)
    return instance.get_run_by_id(dagster_run.run_id)


def test_chain_success_path_candidates_and_completion(instance, store):
    run = new_run(store)
    result, cursor = tick(instance, store)
    assert keys(result) == [(TRAIN_JOB, f"{run.run_id}/0")]
    req = result.run_requests[0]
    assert req.partition_key == "en-gb-scotland"
    assert req.tags["dagster/max_runtime"] == str(60 + 120) and req.tags["mloc/job_index"] == "0"
    config = req.run_config["ops"]["adapter_checkpoint"]["config"]
    assert config == {"run_id": run.run_id, "job_index": 0, "timebox_s": 60, "lr": 0.001, "r": 8,
                      "target_modules": ["head"]}
    assert isinstance(config["r"], int)  # typed as the training job takes it

    again, cursor2 = tick(instance, store, cursor)  # job 0 in flight: nothing new, same cursor
    assert keys(again) == [] and json.loads(cursor2) == json.loads(cursor)

    succeed(store, run, 0)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(TRAIN_JOB, f"{run.run_id}/1")]
    succeed(store, run, 1)  # K=2: job 1 is a candidate point
    result, cursor = tick(instance, store, cursor)
    assert sorted(keys(result)) == sorted([(CANDIDATE_JOB, f"{run.run_id}/candidate/1"), (TRAIN_JOB, f"{run.run_id}/2")])
    assert keys(tick(instance, store, cursor)[0]) == []
    succeed(store, run, 2)  # the last job: a candidate, and the run completes once it has its verdict
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(CANDIDATE_JOB, f"{run.run_id}/candidate/2")]
    assert store.get_run(run.run_id).status == "active"
    result, cursor = tick(instance, store, cursor)  # (no Dagster run of it here: nothing to wait for)
    assert keys(result) == [] and store.get_run(run.run_id).status == "completed"
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == []
    assert json.loads(cursor)["requested"] == {}  # finished runs leave the cursor: it stays small


def test_failure_waits_for_retries_then_fails_the_run(instance, store):
    run = new_run(store)
    _, cursor = tick(instance, store)
    store.record_job_started(run.run_id, 0)
    first = failed_dagster_run(instance, run, 0, retry_number=0)  # Dagster will retry (max_retries=2)
    assert first.tags["dagster/will_retry"] == "true"
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [] and store.get_run(run.run_id).status == "active"
    second = failed_dagster_run(instance, run, 0, retry_number=1, parent=first)
    last = failed_dagster_run(instance, run, 0, retry_number=2, parent=second)  # the last retry failed too
    assert last.tags["dagster/will_retry"] == "false"
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == []
    failed = store.get_run(run.run_id)
    assert failed.status == "failed" and "job 0 failed after 3 attempt(s)" in failed.status_reason
    assert tick(instance, store, cursor)[0].run_requests == []


def test_retried_job_success_continues_the_chain(instance, store):
    run = new_run(store)
    _, cursor = tick(instance, store)
    failed_dagster_run(instance, run, 0, retry_number=0)
    _, cursor = tick(instance, store, cursor)
    succeed(store, run, 0)  # the retry (same run key's job) succeeded
    result, _ = tick(instance, store, cursor)
    assert keys(result) == [(TRAIN_JOB, f"{run.run_id}/1")]


def test_pause_resume_cancel(instance, store):
    run = new_run(store, jobs=4, every=4)
    _, cursor = tick(instance, store)
    assert pause_run(store, run.run_id)
    succeed(store, run, 0)  # the job in flight finishes while paused
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [] and store.get_run(run.run_id).status == "paused"
    assert resume_run(store, run.run_id)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(TRAIN_JOB, f"{run.run_id}/1/g1")]  # continues from job 0's checkpoint
    assert keys(tick(instance, store, cursor)[0]) == []

    in_flight = instance.add_run(dg.DagsterRun(job_name=TRAIN_JOB, run_id=str(uuid.uuid4()),
                                               status=dg.DagsterRunStatus.NOT_STARTED,
                                               tags={"mloc/run_id": run.run_id, "mloc/job_index": "1"}))
    store.record_job_started(run.run_id, 1)
    terminated = cancel_run(instance, store, run.run_id)
    assert terminated == [in_flight.run_id]
    assert instance.get_run_by_id(in_flight.run_id).status == dg.DagsterRunStatus.CANCELED
    assert store.get_job(run.run_id, 1).status == "failed"
    succeed(store, run, 1)  # the worker reports success late: recorded, never merged
    assert store.get_job(run.run_id, 1).status == "discarded"
    assert keys(tick(instance, store, cursor)[0]) == [] and store.get_run(run.run_id).status == "cancelled"


def test_resume_while_the_job_is_in_flight_does_not_launch_it_twice(instance, store):
    run = new_run(store, jobs=3, every=3)
    _, cursor = tick(instance, store)
    store.record_job_started(run.run_id, 0)
    assert pause_run(store, run.run_id) and resume_run(store, run.run_id)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == []  # job 0 still runs: no second copy under the new generation's key
    succeed(store, run, 0)
    assert keys(tick(instance, store, cursor)[0]) == [(TRAIN_JOB, f"{run.run_id}/1/g1")]


def canceled_dagster_run(instance, run, i):
    dagster_run = instance.add_run(dg.DagsterRun(job_name=TRAIN_JOB, run_id=str(uuid.uuid4()),
                                                 status=dg.DagsterRunStatus.STARTED,
                                                 tags={"mloc/run_id": run.run_id, "mloc/job_index": str(i)}))
    instance.report_run_canceled(dagster_run, message="terminated in the UI")
    return dagster_run


def test_a_canceled_job_pauses_the_run_and_resume_requests_it_again(instance, store):
    run = new_run(store)
    _, cursor = tick(instance, store)
    store.record_job_started(run.run_id, 0)
    canceled_dagster_run(instance, run, 0)
    result, cursor = tick(instance, store, cursor)
    paused = store.get_run(run.run_id)
    assert keys(result) == [] and paused.status == "paused" and "was canceled" in paused.status_reason
    assert store.get_job(run.run_id, 0).status == "failed"
    assert keys(tick(instance, store, cursor)[0]) == []  # the same cancellation is handled once
    assert resume_run(store, run.run_id)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(TRAIN_JOB, f"{run.run_id}/0/g1")]
    assert store.get_job(run.run_id, 0).status == "queued"


def test_a_job_refused_while_paused_is_not_a_failure(instance, store):
    run = new_run(store)
    _, cursor = tick(instance, store)
    assert pause_run(store, run.run_id)
    store.mark_job_failed(run.run_id, 0, "refused to start: training run paused")
    dagster_run = instance.add_run(dg.DagsterRun(
        job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
        tags={"mloc/run_id": run.run_id, "mloc/job_index": "0", "mloc/refused": "paused",
              "dagster/retry_on_asset_or_op_failure": "false"}))
    instance.report_run_failed(dagster_run)
    _, cursor = tick(instance, store, cursor)
    assert store.get_run(run.run_id).status == "paused"
    assert resume_run(store, run.run_id)
    assert keys(tick(instance, store, cursor)[0]) == [(TRAIN_JOB, f"{run.run_id}/0/g1")]


def test_a_run_with_an_unknown_hparam_fails_with_the_allowed_keys(instance, store):
    run = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                           hparams={"lora_r": 8}, timebox_s=60, max_jobs=2, candidate_every=2)
    result, _ = tick(instance, store)
    assert keys(result) == []
    failed = store.get_run(run.run_id)
    assert failed.status == "failed" and "unknown hparam(s) lora_r; allowed: alpha" in failed.status_reason


def test_several_runs_and_dialects(instance, store):
    a = new_run(store)
    b = store.create_run(dialect="en-gb-x-gbclan", dataset_version="/d", base_model_version="/m",
                         timebox_s=60, max_jobs=2, candidate_every=1)
    result, cursor = tick(instance, store)
    assert sorted(keys(result)) == sorted([(TRAIN_JOB, f"{a.run_id}/0"), (TRAIN_JOB, f"{b.run_id}/0")])
    succeed(store, b, 0)
    result, _ = tick(instance, store, cursor)
    assert sorted(keys(result)) == sorted([(CANDIDATE_JOB, f"{b.run_id}/candidate/0"), (TRAIN_JOB, f"{b.run_id}/1")])
    assert {r.partition_key for r in result.run_requests} == {"en-gb-x-gbclan"}


# -- every ended Dagster run of the line is read: candidate jobs, replays --------------------------


@pytest.fixture()
def line_store(instance):
    """The store the assets see ($MLOC_HOME), on an instance that knows the dialect (and has no
    base model: a candidate job executed on it fails for real)."""
    instance.add_dynamic_partitions("dialect", [DIALECT])
    return StateStore(resolve_state_url())


def execute(instance, request, **kw):
    """Execute a requested run for real, in process, with the request's tags."""
    return defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=request.tags, run_config=request.run_config,
        raise_on_error=False, **kw)


def step_error(result) -> str:
    return result.get_step_failure_events()[0].step_failure_data.error.message


def test_a_candidate_job_that_fails_pauses_the_run_and_resume_requests_it_again(instance, line_store):
    store = line_store
    run = new_run(store, jobs=2, every=2)
    _, cursor = tick(instance, store)
    succeed(store, run, 0)
    _, cursor = tick(instance, store, cursor)
    succeed(store, run, 1)
    result, cursor = tick(instance, store, cursor)
    [request] = result.run_requests  # the last job's candidate: the run waits for its verdict
    assert request.job_name == CANDIDATE_JOB and store.get_run(run.run_id).status == "active"
    failed = execute(instance, request)  # no base_model on this instance: the merge fails
    assert not failed.success and "base_model has never been materialized" in step_error(failed)

    result, cursor = tick(instance, store, cursor)
    paused = store.get_run(run.run_id)
    assert keys(result) == [] and paused.status == "paused", paused
    assert paused.status_reason.startswith(
        f"the candidate job after job 1 (Dagster run {failed.run_id[:8]}) failed (base_model has never been")
    assert "before it recorded a candidate" in paused.status_reason
    assert f"`mloc run resume {run.run_id}` continues the run" in paused.status_reason
    assert keys(tick(instance, store, cursor)[0]) == []  # read once
    assert resume_run(store, run.run_id)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(CANDIDATE_JOB, f"{run.run_id}/candidate/1/g1")]
    assert store.get_run(run.run_id).status == "active"  # completes only once the candidate has a verdict


def test_an_ungated_candidate_releases_its_adapters_and_is_never_gated(instance, line_store):
    store = line_store
    run = new_run(store, jobs=1, every=1)
    _, cursor = tick(instance, store)
    succeed(store, run, 0)
    [request], cursor = (lambda r: (r[0].run_requests, r[1]))(tick(instance, store, cursor))
    # The merge recorded its candidate under the Dagster run; then the gate crashes (no base model).
    dagster_run_id = str(uuid.uuid4())
    store.record_candidate(candidate_id="cand-ungated", dialect=DIALECT, adapter_path="/cand/u", sha256="u",
                           trusted=True, sources=store.unclaimed_adapters(DIALECT), dagster_run_id=dagster_run_id,
                           training_run_id=run.run_id)
    gate = execute(instance, request, run_id=dagster_run_id, asset_selection=[dg.AssetKey("gate_report")])
    assert not gate.success and store.unclaimed_adapters(DIALECT) == []

    result, cursor = tick(instance, store, cursor)
    paused = store.get_run(run.run_id)
    assert keys(result) == [] and paused.status == "paused", paused
    assert "before the gate of cand-ungated decided: it is released, its 1 adapter(s) go into the next " \
           "candidate" in paused.status_reason and "merges and gates them again" in paused.status_reason
    released = store.get_candidate("cand-ungated")
    assert released.gate_decision == "released" and "never gated" in released.details["released"]
    assert [(r.run_id, r.job_index) for r in store.unclaimed_adapters(DIALECT)] == [(run.run_id, 0)]
    regate = defs.resolve_job_def(CANDIDATE_JOB).execute_in_process(
        instance=instance, partition_key=DIALECT, raise_on_error=False, asset_selection=[dg.AssetKey("gate_report")],
        run_config={"ops": {"gate_report": {"config": {"candidate_id": "cand-ungated"}}}})
    assert "candidate cand-ungated was released" in step_error(regate)
    assert resume_run(store, run.run_id)
    result, _ = tick(instance, store, cursor)
    assert keys(result) == [(CANDIDATE_JOB, f"{run.run_id}/candidate/0/g1")]


def candidate_dagster_run(instance, run, job_name=CANDIDATE_JOB, status=dg.DagsterRunStatus.STARTED):
    return instance.add_run(dg.DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=status,
                                          tags={"mloc/run_id": run.run_id, "mloc/job_index": "0"}))


def test_a_canceled_candidate_pauses_its_run_a_failed_gate_does_not(instance, store):
    canceled, judged = new_run(store, jobs=1, every=1), new_run(store, jobs=1, every=1)
    _, cursor = tick(instance, store)
    succeed(store, canceled, 0)
    succeed(store, judged, 0)
    result, cursor = tick(instance, store, cursor)
    assert [r.job_name for r in result.run_requests] == [CANDIDATE_JOB, CANDIDATE_JOB]
    instance.report_run_canceled(candidate_dagster_run(instance, canceled), message="terminated in the UI")
    # The gate decided "failed": its blocking checks fail the Dagster run. That is a verdict.
    gated = candidate_dagster_run(instance, judged)
    candidate = store.record_candidate(dialect=DIALECT, adapter_path="/c", sha256="c", trusted=True,
                                       sources=[r for r in store.unclaimed_adapters(DIALECT)
                                                if r.run_id == judged.run_id],
                                       dagster_run_id=gated.run_id, training_run_id=judged.run_id)
    store.set_gate_result(candidate.candidate_id, "failed", "/r.json")
    instance.report_run_failed(gated)
    result, cursor = tick(instance, store, cursor)
    paused = store.get_run(canceled.run_id)
    assert paused.status == "paused" and ") was canceled, before it recorded a candidate" in paused.status_reason
    assert store.get_run(judged.run_id).status == "completed"
    assert store.get_candidate(candidate.candidate_id).gate_decision == "failed"  # kept, with its adapters


def test_a_tts_run_waits_for_the_stop_loss_before_its_next_job(instance, store):
    run = store.create_run(dialect=DIALECT, dataset_version="/d", base_model_version="/m", timebox_s=60,
                           max_jobs=2, candidate_every=1, track="tts")
    _, cursor = tick(instance, store)
    succeed(store, run, 0)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(TTS_CANDIDATE_JOB, f"{run.run_id}/candidate/0")]  # not job 1: it waits
    judging = candidate_dagster_run(instance, run, TTS_CANDIDATE_JOB, dg.DagsterRunStatus.NOT_STARTED)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == []  # the stop-loss has not spoken yet
    instance.report_dagster_event(dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_SUCCESS.value,
                                                  job_name=TTS_CANDIDATE_JOB), run_id=judging.run_id)
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == [(TTS_TRAIN_JOB, f"{run.run_id}/1")]


def test_a_replay_of_the_exhausted_job_reactivates_the_run_without_a_second_copy(instance, store):
    run = new_run(store, jobs=3, every=3)
    _, cursor = tick(instance, store)
    succeed(store, run, 0)
    _, cursor = tick(instance, store, cursor)
    store.record_job_started(run.run_id, 1)
    failed = None
    for attempt in range(3):  # 1 + max_retries=2 attempts
        failed = failed_dagster_run(instance, run, 1, retry_number=attempt, parent=failed)
    _, cursor = tick(instance, store, cursor)
    _, cursor = tick(instance, store, cursor)  # a failed run leaves the cursor
    assert store.get_run(run.run_id).status == "failed" and run.run_id not in json.loads(cursor)["requested"]

    # `mloc run replay`: Dagster's re-execution is queued, then the run is re-activated.
    instance.add_run(dg.DagsterRun(job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED,
                                   parent_run_id=failed.run_id, root_run_id=failed.run_id,
                                   tags={"mloc/run_id": run.run_id, "mloc/job_index": "1"}))
    assert reactivate_run(store, run.run_id, 1, f"re-activated: job 1 replayed (was {failed.run_id})")
    active = store.get_run(run.run_id)
    assert (active.status, active.generation) == ("active", 1) and "replayed" in active.status_reason
    assert store.get_job(run.run_id, 1).status == "queued"
    result, cursor = tick(instance, store, cursor)
    assert keys(result) == []  # the replayed job is in flight: no second copy of it
    succeed(store, run, 1)
    assert keys(tick(instance, store, cursor)[0]) == [(TRAIN_JOB, f"{run.run_id}/2/g1")]
    assert not reactivate_run(store, run.run_id, 1, "not failed")  # only a failed run


BASE = "ab" * 32  # a base model directory named by its content hash, as the base_model asset writes it


def write_around_start(store, run_id, **values):
    """Change a stored run the way a hand edit or an older release could: past start_run's checks."""
    from mloc_dagster.core.state.schema import training_runs

    with store.engine.begin() as conn:
        conn.execute(training_runs.update().where(training_runs.c.run_id == run_id).values(**values))


def test_runs_that_cannot_be_advanced_fail_alone_and_the_others_advance_in_the_same_tick(instance, store):
    good = new_run(store)
    not_a_mapping = new_run(store)
    write_around_start(store, not_a_mapping.run_id, hparams=[1])
    store.record_job_throughput("node-a", BASE, 10.0, source="calibrate")  # a pool the round could be placed on
    distributed = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version=f"/models/{BASE}",
                                   hparams={"r": "six"}, timebox_s=60, max_jobs=2, candidate_every=2,
                                   kind="distributed", parallelism=1, round_samples=10)
    stages = [{"name": "adapt", "kind": "training_run", "dialect": "en-gb-scotland", "jobs": "six"}]
    six_jobs = store.create_run(dialect="en-gb-scotland", dataset_version="", base_model_version="", kind="pipeline",
                                max_jobs=1, candidate_every=1, spec={"stages": stages})
    bad_config = store.create_run(dialect="en-gb-scotland", dataset_version="", base_model_version="",
                                  kind="pipeline", max_jobs=1, candidate_every=1, spec={"stages": [
                                      {"name": "base", "kind": "base_model", "config": {"max_steps": "x"}}]})

    result, cursor = tick(instance, store)
    assert keys(result) == [(TRAIN_JOB, f"{good.run_id}/0")]
    for run, why in ((not_a_mapping, "hparams must be a JSON object of name: value"),
                     (distributed, "r: Input should be a valid integer"),
                     (six_jobs, "stage adapt: jobs must be an integer >= 1, got 'six'"),
                     (bad_config, "stage base: config: Invalid scalar at path root:ops:base_model:config:max_steps")):
        failed = store.get_run(run.run_id)
        assert failed.status == "failed" and why in failed.status_reason, (run.run_id, failed.status_reason)
    assert store.round_slices(distributed.run_id, 0) == []  # refused before any placement took quota
    assert store.get_node("node-a").jobs_today == 0
    assert json.loads(cursor)["requested"][good.run_id] == [0, 0, -1]  # the cursor moved
    again, cursor = tick(instance, store, cursor)
    assert keys(again) == [] and list(json.loads(cursor)["requested"]) == [good.run_id]


def test_an_unexpected_error_pauses_that_run_and_resume_continues_it(instance, store):
    good, odd = new_run(store), new_run(store)
    write_around_start(store, odd.run_id, track="video")  # no such track: nothing to decide with
    result, cursor = tick(instance, store)
    assert keys(result) == [(TRAIN_JOB, f"{good.run_id}/0")]
    paused = store.get_run(odd.run_id)
    assert paused.status == "paused"
    assert "could not decide on it (ValueError: track 'video' is not one of asr, tts)" in paused.status_reason
    assert f"mloc run resume {odd.run_id}" in paused.status_reason
    write_around_start(store, odd.run_id, track="asr")  # fixed: nothing was lost
    assert resume_run(store, odd.run_id)
    result, _ = tick(instance, store, cursor)
    assert keys(result) == [(TRAIN_JOB, f"{odd.run_id}/0/g1")]


def test_each_track_with_every_default_pinned_passes_the_range_checks(instance, store):
    """The checks that refuse a corrupt row accept what `mloc run start` stores (TTS dropout -1: the
    model's default)."""
    from mloc_dagster.assets.tracks import pin_hparams
    from mloc_dagster.assets.tts.training import TTS_TRAIN_JOB

    runs = {track: store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                                    hparams=pin_hparams({}, track), timebox_s=60, max_jobs=2, candidate_every=2,
                                    track=track) for track in ("asr", "tts")}
    result, _ = tick(instance, store)
    assert sorted(keys(result)) == sorted([(TRAIN_JOB, f"{runs['asr'].run_id}/0"), (TTS_TRAIN_JOB, f"{runs['tts'].run_id}/0")])
