"""training_chain_sensor: advances every active training run, one timeboxed job at a time.

Each tick reads only what can have changed: training jobs whose Dagster run ended failed or
canceled since the cursor (bounded, ordered by update time) and the live runs in the state store.
Decisions come from ``core.chain.next_due``; run keys ``<run_id>/<job_index>`` (``/g<N>`` after the
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
"""


import json
from datetime import datetime

import dagster as dg

from mloc_dagster.assets.adapters import InvalidHParams
from mloc_dagster.core.chain import next_due
from mloc_dagster.core.state import ACTIVE, COMPLETED, FAILED, PAUSED, SUCCEEDED, StateStore, TrainingRun
from mloc_dagster.jobs import (
    CANDIDATE_JOB,
    TRAIN_JOB,
    candidate_job,
    chain_run_key,
    train_adapter_job,
    train_run_request,
)
from mloc_dagster.resources.state import StateStoreResource

FAILURE_BATCH = 100
ENDED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def will_retry(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Dagster's verdict (``dagster/will_retry``, set when the run failed); computed the same way
    while the tag is not written yet."""
    tag = run.tags.get("dagster/will_retry")
    if tag is not None:
        return tag == "true"
    if not instance.run_retries_enabled or run.tags.get("dagster/retry_on_asset_or_op_failure") == "false":
        return False
    max_retries = int(run.tags.get("dagster/max_retries", instance.run_retries_max_retries))
    return int(run.tags.get("dagster/retry_number", "0")) < max_retries


def failure_reason(instance: dg.DagsterInstance, dagster_run_id: str) -> str:
    for record in instance.all_logs(dagster_run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[-1:]:
        error = record.dagster_event.step_failure_data.error
        if error is not None:
            return error.message.strip().splitlines()[0][:500]
    return "the Dagster run failed (see its logs)"


def handle_ended_job(context: dg.SensorEvaluationContext, store: StateStore, run: dg.DagsterRun) -> None:
    run_id, job_index = run.tags["mloc/run_id"], int(run.tags["mloc/job_index"])
    job = store.get_job(run_id, job_index)
    if run.tags.get("mloc/refused") or (job is not None and job.status == SUCCEEDED):
        return
    if run.status == dg.DagsterRunStatus.CANCELED:
        reason = (f"job {job_index}'s Dagster run {run.run_id[:8]} was canceled; `mloc run resume {run_id}` "
                  "retries it from its last checkpoint")
        store.mark_job_failed(run_id, job_index, f"Dagster run {run.run_id} canceled")
        if store.transition_run(run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run_id} paused: {reason}")
        return
    if will_retry(context.instance, run):
        return
    reason = f"job {job_index} failed after {int(run.tags.get('dagster/retry_number', '0')) + 1} attempt(s): " \
             f"{failure_reason(context.instance, run.run_id)}"
    store.mark_job_failed(run_id, job_index, reason)
    if store.transition_run(run_id, (ACTIVE, PAUSED), FAILED, reason):
        context.log.warning(f"training run {run_id} failed: {reason}")


def train_requested_in(store: StateStore, run: TrainingRun, entry: list[int]) -> int:
    """The highest job index already requested in the run's current generation. After a resume,
    a next job that is not in flight (it failed, was canceled or refused) is due again."""
    generation, train_requested = entry[0], entry[1]
    if generation == run.generation:
        return train_requested
    nxt = (-1 if run.last_finished_job is None else run.last_finished_job) + 1
    job = store.get_job(run.run_id, nxt)
    return train_requested if job is not None and job.status not in (FAILED,) else nxt - 1


@dg.sensor(jobs=[train_adapter_job, candidate_job], minimum_interval_seconds=5,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Requests the next timeboxed job of every active training run, and a candidate "
                       "every K jobs; fails a run whose job exhausted Dagster's run retries and pauses "
                       "one whose job was canceled.")
def training_chain_sensor(context: dg.SensorEvaluationContext, state: StateStoreResource) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    failures_after = cursor.get("failures_after")
    requested: dict[str, list[int]] = cursor.get("requested", {})  # run_id -> [generation, train, candidate]
    store = state.store()
    live_ids = {r.run_id for r in store.list_runs(status=(ACTIVE, PAUSED), limit=None)}

    # 1. Jobs that ended badly. Those of runs no longer live cost one skipped record, nothing more.
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=TRAIN_JOB, statuses=ENDED_BADLY,
                              updated_after=datetime.fromisoformat(failures_after) if failures_after else None),
        limit=FAILURE_BATCH, order_by="update_timestamp", ascending=True)
    for record in records:
        failures_after = record.update_timestamp.isoformat()
        if record.dagster_run.tags.get("mloc/run_id") in live_ids and "mloc/job_index" in record.dagster_run.tags:
            handle_ended_job(context, store, record.dagster_run)

    # 2. What each active run needs next.
    run_requests = []
    for run in store.list_runs(status=(ACTIVE, PAUSED), limit=None):
        entry = requested.get(run.run_id, [run.generation, -1, -1])
        train_req, cand_req = train_requested_in(store, run, entry), entry[2]
        for due in next_due(run, train_req, cand_req):
            if due.kind == "train":
                try:
                    request = train_run_request(run, due.job_index)
                except InvalidHParams as exc:  # a row written around `mloc run start`: say so, once
                    store.transition_run(run.run_id, (ACTIVE, PAUSED), FAILED, str(exc))
                    break
                store.record_job_queued(run.run_id, due.job_index)
                run_requests.append(request)
                train_req = due.job_index
            elif due.kind == "candidate":
                run_requests.append(dg.RunRequest(
                    job_name=CANDIDATE_JOB, partition_key=run.dialect,
                    run_key=chain_run_key(run, "candidate", due.job_index),
                    tags={"mloc/run_id": run.run_id, "mloc/job_index": str(due.job_index)}))
                cand_req = due.job_index
            elif store.transition_run(run.run_id, ACTIVE, COMPLETED, f"all {run.max_jobs} jobs succeeded"):
                context.log.info(f"training run {run.run_id} completed")
        requested[run.run_id] = [run.generation, train_req, cand_req]

    cursor = {"failures_after": failures_after,
              "requested": {k: v for k, v in requested.items() if k in live_ids}}
    return dg.SensorResult(run_requests=run_requests, cursor=json.dumps(cursor, sort_keys=True))


defs = dg.Definitions(sensors=[training_chain_sensor])
