"""training_chain_sensor: advances every active training run, one timeboxed job at a time.

Each tick reads only what can have changed: Dagster run failures since the cursor (bounded,
ordered by update time) and the active runs in the state store. Decisions come from
``core.chain.next_due``; run keys ``<run_id>/<job_index>`` make a repeated decision harmless.
"""


import json
from datetime import datetime

import dagster as dg

from mloc_dagster.core.chain import next_due
from mloc_dagster.core.state import ACTIVE, COMPLETED, FAILED, PAUSED
from mloc_dagster.jobs import CANDIDATE_JOB, TRAIN_JOB, candidate_job, train_adapter_job, train_run_request
from mloc_dagster.resources.state import StateStoreResource

FAILURE_BATCH = 100


def retries_exhausted(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    if not instance.run_retries_enabled:
        return True
    max_retries = int(run.tags.get("dagster/max_retries", instance.run_retries_max_retries))
    return int(run.tags.get("dagster/retry_number", "0")) >= max_retries


def failure_reason(instance: dg.DagsterInstance, dagster_run_id: str) -> str:
    for record in instance.all_logs(dagster_run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[-1:]:
        error = record.dagster_event.step_failure_data.error
        if error is not None:
            return error.message.strip().splitlines()[0][:500]
    return "the Dagster run failed (see its logs)"


@dg.sensor(jobs=[train_adapter_job, candidate_job], minimum_interval_seconds=5,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Requests the next timeboxed job of every active training run, and a candidate "
                       "every K jobs; fails a run whose job exhausted Dagster's run retries.")
def training_chain_sensor(context: dg.SensorEvaluationContext, state: StateStoreResource) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    failures_after = cursor.get("failures_after")
    requested: dict[str, list[int]] = cursor.get("requested", {})  # run_id -> [train, candidate]
    store = state.store()
    live = store.list_runs(status=(ACTIVE, PAUSED), limit=None)
    live_ids = {r.run_id for r in live}

    # 1. A job whose retries are exhausted fails its training run, with the reason. Failures of
    #    runs that are no longer live cost one skipped record, never a log read or a write.
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=TRAIN_JOB, statuses=[dg.DagsterRunStatus.FAILURE],
                              updated_after=datetime.fromisoformat(failures_after) if failures_after else None),
        limit=FAILURE_BATCH, order_by="update_timestamp", ascending=True)
    for record in records:
        run = record.dagster_run
        failures_after = record.update_timestamp.isoformat()
        run_id, job_index = run.tags.get("mloc/run_id"), run.tags.get("mloc/job_index")
        if run_id not in live_ids or job_index is None or not retries_exhausted(context.instance, run):
            continue
        reason = f"job {job_index} failed after {int(run.tags.get('dagster/retry_number', '0')) + 1} attempt(s): " \
                 f"{failure_reason(context.instance, run.run_id)}"
        store.mark_job_failed(run_id, int(job_index), reason)
        if store.transition_run(run_id, (ACTIVE, PAUSED), FAILED, reason):
            context.log.warning(f"training run {run_id} failed: {reason}")

    # 2. What each active run needs next.
    run_requests = []
    for run in store.list_runs(status=(ACTIVE, PAUSED), limit=None):
        train_req, cand_req = requested.get(run.run_id, [-1, -1])
        for due in next_due(run, train_req, cand_req):
            if due.kind == "train":
                store.record_job_queued(run.run_id, due.job_index)
                run_requests.append(train_run_request(run, due.job_index))
                train_req = due.job_index
            elif due.kind == "candidate":
                run_requests.append(dg.RunRequest(
                    job_name=CANDIDATE_JOB, partition_key=run.dialect, run_key=due.run_key,
                    tags={"mloc/run_id": run.run_id, "mloc/job_index": str(due.job_index)}))
                cand_req = due.job_index
            elif store.transition_run(run.run_id, ACTIVE, COMPLETED, f"all {run.max_jobs} jobs succeeded"):
                context.log.info(f"training run {run.run_id} completed")
        requested[run.run_id] = [train_req, cand_req]

    cursor = {"failures_after": failures_after,
              "requested": {k: v for k, v in requested.items() if k in live_ids}}
    return dg.SensorResult(run_requests=run_requests, cursor=json.dumps(cursor, sort_keys=True))


defs = dg.Definitions(sensors=[training_chain_sensor])
