"""training_chain_sensor: advances every active training run, one timeboxed job at a time.

Each tick reads only what can have changed: training jobs whose Dagster run ended failed or
canceled since the cursor (bounded, ordered by update time) and the live runs in the state store.
Decisions come from ``core.training.chain.next_due``; run keys ``<run_id>/<job_index>`` (``/g<N>`` after the
N-th resume) make a repeated decision harmless.

A job that ends badly is handled with Dagster's own signals:
- ``FAILURE`` with ``dagster/will_retry=false`` (run retries exhausted, or none configured): the
  training run fails, with the reason from the step failure;
- ``CANCELED`` (terminated in the UI, by the launcher, by ``dagster run delete``...): the training
  run is *paused* with the reason -- a person or the platform stopped it on purpose, so the chain
  does not fight back; ``mloc run resume`` requests the job again under a new run key and it
  resumes from its last checkpoint;
- a job that refused to start because its training run was paused or cancelled (tag
  ``mloc/refused``) needs nothing: resume re-requests it.

Candidate jobs (``candidate_job``, ``tts_candidate_job``) are read too (``runs/verdicts.py``):
one that failed or was canceled before its gate spoke pauses its training run with the reason and
releases its candidate's adapters; resume requests it again. A failed gate is a verdict, not a
failure of the job. A run completes only once its last candidate has its verdict, and a TTS run's
next job waits for the previous candidate's (``sensors/stop_loss.py``).

A *distributed* run advances by rounds instead (``sensors/rounds.py``): each round is placed on
the pool as slices, one Dagster run of the training job each, and closed by the round merge
(``round_merge_job``), whose adapter is the run's job ``round``. A canceled slice or round merge
pauses the run like a canceled job and is requested again on resume; a slice that fails for good
leaves its round (its samples go into the next one); a round merge that fails for good fails the run.

A *TTS* run (track ``tts``) chains ``tts_train_adapter_job`` and ``tts_candidate_job`` the same
way; when its candidate fails the stop-loss gate the run is paused (``sensors/stop_loss.py``).
A training run that failed because a job exhausted its retries is re-activated by the replay of
that job (``mloc run replay``); the chain then sees the replayed job in flight and goes on.

A *hyperparameter* search (``sensors/search.py``) starts its trials as single runs and judges each
finished job with its pruner before the trial's next job is requested. A *pipeline*
(``sensors/pipeline.py``) starts each declared stage when the stages it waits for succeeded.
"""


import json
from datetime import datetime

import dagster as dg

from mloc_dagster.assets.pool.rounds import ROUND_MERGE_JOB
from mloc_dagster.assets.tracks import TRACKS, track_of, validate_hparams
from mloc_dagster.core.pool.assign import place_job
from mloc_dagster.core.pool.placement import PlacementError
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, COMPLETED, DROPPED, FAILED, HYPERPARAMETER, PAUSED, PIPELINE, SUCCEEDED
from mloc_dagster.core.training.chain import next_due
from mloc_dagster.resources.state import StateStoreResource
from mloc_dagster.runs.requests import CHAIN_JOBS, candidate_run_request, train_run_request
from mloc_dagster.runs.verdicts import failure_reason, handle_ended_candidate, has_verdict, will_retry
from mloc_dagster.sensors.isolation import isolated
from mloc_dagster.sensors.pipeline import pipeline_requests
from mloc_dagster.sensors.rounds import round_requests
from mloc_dagster.sensors.search import search_requests
from mloc_dagster.sensors.stop_loss import IN_FLIGHT, apply_stop_loss, newest_candidate_run, verdict_pending

FAILURE_BATCH = 100
# Runs of these jobs that ended badly since the cursor's time are read every tick.
FAILURE_CURSORS = {ROUND_MERGE_JOB: "merge_failures_after"} | {
    job: f"{t.cursor_prefix}{what}_after" for t in TRACKS.values()
    for job, what in ((t.train_job, "failures"), (t.candidate_job, "candidate_failures"))}
CANDIDATE_JOBS = {t.candidate_job for t in TRACKS.values()}
ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
PARENT_REQUESTS = {HYPERPARAMETER: search_requests, PIPELINE: pipeline_requests}


def handle_ended_job(context: dg.SensorEvaluationContext, store: StateStore, run: dg.DagsterRun) -> None:
    run_id = run.tags["mloc/run_id"]
    if "mloc/job_index" not in run.tags and "mloc/round" not in run.tags:
        return  # launched by hand outside any chain
    if "mloc/slice" in run.tags:
        return handle_ended_slice(context, store, run)
    job_index = int(run.tags.get("mloc/job_index", run.tags.get("mloc/round", "0")))
    what = f"round {job_index}'s merge" if run.job_name == ROUND_MERGE_JOB else f"job {job_index}"
    job = store.get_job(run_id, job_index)
    if run.tags.get("mloc/refused") or (job is not None and job.status == SUCCEEDED):
        return
    if run.status == dg.DagsterRunStatus.CANCELED:
        reason = (f"{what}'s Dagster run {run.run_id[:8]} was canceled; `mloc run resume {run_id}` "
                  "requests it again" + ("" if run.job_name == ROUND_MERGE_JOB else " from its last checkpoint"))
        store.mark_job_failed(run_id, job_index, f"Dagster run {run.run_id} canceled")
        if store.transition_run(run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run_id} paused: {reason}")
        return
    if will_retry(context.instance, run):
        return
    reason = f"{what} failed after {int(run.tags.get('dagster/retry_number', '0')) + 1} attempt(s): " \
             f"{failure_reason(context.instance, run.run_id)}"
    store.mark_job_failed(run_id, job_index, reason)
    if store.transition_run(run_id, (ACTIVE, PAUSED), FAILED, reason):
        context.log.warning(f"training run {run_id} failed: {reason}")


def handle_ended_slice(context: dg.SensorEvaluationContext, store: StateStore, run: dg.DagsterRun) -> None:
    """A canceled slice goes back to queued and pauses its run, like a canceled job: `mloc run
    resume` requests it again under a new run key (its round is never failed for it). A slice
    that failed for good leaves the round (its samples go into the next round)."""
    run_id, k, index = run.tags["mloc/run_id"], int(run.tags["mloc/round"]), int(run.tags["mloc/slice"])
    if run.tags.get("mloc/refused"):
        return
    if run.status == dg.DagsterRunStatus.CANCELED:
        if not store.requeue_slice(run_id, k, index, f"Dagster run {run.run_id} canceled: requested again on resume",
                                   dagster_run_id=run.run_id):
            return  # it finished, its round dropped or replaced it, or another run trains it: nothing to do
        reason = (f"round {k} slice {index}'s Dagster run {run.run_id[:8]} was canceled; "
                  f"`mloc run resume {run_id}` requests it again")
        if store.transition_run(run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run_id} paused: {reason}")
    elif not will_retry(context.instance, run):
        store.end_slice(run_id, k, index, DROPPED, f"failed: {failure_reason(context.instance, run.run_id)}")


def ended_badly(context: dg.SensorEvaluationContext, job_name: str, after: str | None) -> list[dg.RunRecord]:
    return context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=ENDED_BADLY,
                              updated_after=datetime.fromisoformat(after) if after else None),
        limit=FAILURE_BATCH, order_by="update_timestamp", ascending=True)


def train_requested_in(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun,
                       entry: list[int] | None) -> int:
    """The highest job index already requested in the run's current generation. After a resume,
    a next job that is not in flight (it failed, was canceled or refused) is due again; after a
    replay re-activated the run (not in the cursor any more), the replayed job is in flight."""
    if entry is not None and entry[0] == run.generation:
        return entry[1]
    nxt = (-1 if run.last_finished_job is None else run.last_finished_job) + 1
    job = store.get_job(run.run_id, nxt)
    if entry is not None and job is not None and job.status != FAILED:
        return entry[1]
    in_flight = context.instance.get_run_records(dg.RunsFilter(
        job_name=track_of(run.track).train_job, statuses=IN_FLIGHT,
        tags={"mloc/run_id": run.run_id, "mloc/job_index": str(nxt)}), limit=1)
    return nxt if in_flight else nxt - 1


def candidate_requested_in(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun,
                           entry: list[int] | None) -> int:
    """The highest job index a candidate was requested after, in the run's current generation.
    After a resume, a candidate job that ended without a verdict (it failed or was canceled
    before its gate spoke) is due again."""
    if entry is not None and entry[0] == run.generation:
        return entry[2]
    newest = newest_candidate_run(context.instance, run)
    if newest is None:
        return entry[2] if entry is not None else -1
    index = int(newest.tags.get("mloc/job_index", "-1"))
    return index - 1 if newest.is_finished and not has_verdict(store, newest) else index


def next_requests(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun,
                  entry: list[int] | None) -> tuple[list[dg.RunRequest], list[int]]:
    """The requests one run needs now, and its new cursor entry [generation, train, candidate]."""
    if run.status == ACTIVE:
        validate_hparams(run.hparams, run.track)  # a row written around `mloc run start`: before any placement
    if apply_stop_loss(context, store, run):  # a TTS candidate failed its gate: no next job
        return [], entry or [run.generation, -1, -1]
    requests = []
    train_req = train_requested_in(context, store, run, entry)
    cand_req = asked = candidate_requested_in(context, store, run, entry)
    if run.distributed:  # rounds of slices instead of one job at a time
        requests += round_requests(context, store, run)
        train_req = run.max_jobs
    for due in next_due(run, train_req, cand_req):
        if due.kind == "train":
            if track_of(run.track).stop_loss and verdict_pending(context, store, run, just_requested=cand_req != asked):
                continue  # a TTS run's next job waits for the stop-loss of the candidate before it
            try:
                node = place_job(store, run)  # a Ray pool: the job's node; else where its worker starts
            except PlacementError as exc:
                context.log.warning(f"{run.run_id} job {due.job_index} waits for a node: {exc}")
                break
            request = train_run_request(run, due.job_index, node)
            store.record_job_queued(run.run_id, due.job_index)
            requests.append(request)
            train_req = due.job_index
        elif due.kind == "candidate":
            requests.append(candidate_run_request(run, due.job_index))
            cand_req = due.job_index
        elif verdict_pending(context, store, run, just_requested=cand_req != asked):
            pass  # the last candidate is judged first: the run then completes or pauses
        elif store.transition_run(run.run_id, ACTIVE, COMPLETED, f"all {run.max_jobs} jobs succeeded"):
            context.log.info(f"training run {run.run_id} completed")
    return requests, [run.generation, train_req, cand_req]


# Interval 1 s: the daemon's sensor loop (every ~5 s) evaluates it on every pass; with 5 s a
# pass that came a moment early skipped it, and a finished job waited a second pass.
@dg.sensor(jobs=CHAIN_JOBS, minimum_interval_seconds=1,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Requests the next timeboxed job of every active training run, and a candidate "
                       "every K jobs; fails a run whose job exhausted Dagster's run retries and pauses "
                       "one whose job was canceled.")
def training_chain_sensor(context: dg.SensorEvaluationContext, state: StateStoreResource) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    after = {job: cursor.get(key) for job, key in FAILURE_CURSORS.items()}
    requested: dict[str, list[int]] = cursor.get("requested", {})  # run_id -> [generation, train, candidate]
    store = state.store()
    live_ids = {r.run_id for r in store.list_runs(status=(ACTIVE, PAUSED), limit=None)}

    # 1. Jobs that ended badly. Those of runs no longer live cost one skipped record, nothing more.
    # Every candidate job is read: an ungated candidate gives its adapters back, whoever asked for it.
    for job_name in FAILURE_CURSORS:
        for record in ended_badly(context, job_name, after[job_name]):
            after[job_name] = record.update_timestamp.isoformat()
            run_id = record.dagster_run.tags.get("mloc/run_id")
            if job_name in CANDIDATE_JOBS:
                isolated(context, store, run_id, None, handle_ended_candidate,
                         context, store, record.dagster_run, live_ids)
            elif run_id in live_ids:
                isolated(context, store, run_id, None, handle_ended_job, context, store, record.dagster_run)

    # 2. Searches and pipelines first: a trial's finished job is judged before its next one is
    # requested, a pipeline's next stage starts.
    run_requests = []
    for parent in store.list_runs(status=ACTIVE, limit=None):
        if parent.kind in PARENT_REQUESTS:
            run_requests += isolated(context, store, parent.run_id, [], PARENT_REQUESTS[parent.kind],
                                     context, store, parent)

    # 3. What each active run needs next; an error deciding one run ends at that run.
    for run in store.list_runs(status=(ACTIVE, PAUSED), limit=None):
        if run.kind in (HYPERPARAMETER, PIPELINE):
            continue
        entry = requested.get(run.run_id)
        found, requested[run.run_id] = isolated(context, store, run.run_id,
                                                ([], entry or [run.generation, -1, -1]), next_requests,
                                                context, store, run, entry)
        run_requests += found

    cursor = {**{key: after[job] for job, key in FAILURE_CURSORS.items()},
              "requested": {k: v for k, v in requested.items() if k in live_ids}}
    return dg.SensorResult(run_requests=run_requests, cursor=json.dumps(cursor, sort_keys=True))


defs = dg.Definitions(sensors=[training_chain_sensor])
