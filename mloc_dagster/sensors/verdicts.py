"""Dagster's own verdicts on a run that ended badly, as the training chain reads them."""

import dagster as dg


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
