"""A training run's lifecycle in the words of seed 003, read from Dagster's own run records.

Seed 003 names the states pending → scheduled → running → completed / failed → retrying /
cancelled. mloc keeps no copy of them: the run's own status (active, paused, completed, failed,
cancelled) says where the chain is, and the Dagster run of its job in flight says where that job
is. ``lifecycle`` maps the pair onto the seed's words:

=================================  ==========================================================
Dagster run of the job in flight   lifecycle
=================================  ==========================================================
QUEUED                             pending (waiting in Dagster's queue: concurrency, pools)
NOT_STARTED, STARTING              scheduled (a run worker is being started)
STARTED                            running
FAILURE and ``dagster/will_retry``  retrying (Dagster's run retries will start it again)
FAILURE                            failed
CANCELING, CANCELED                cancelled
=================================  ==========================================================

A run that is not active uses its own status (paused, completed, failed, cancelled); an active
run between two jobs is ``scheduled``. The last lines of a job's log come from Dagster's
captured compute logs (``mloc run logs``).
"""

from __future__ import annotations

import dagster as dg

from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE
from mloc_dagster.runs.verdicts import will_retry

WORDS = {
    dg.DagsterRunStatus.QUEUED: "pending", dg.DagsterRunStatus.NOT_STARTED: "scheduled",
    dg.DagsterRunStatus.STARTING: "scheduled", dg.DagsterRunStatus.STARTED: "running",
    dg.DagsterRunStatus.SUCCESS: "completed", dg.DagsterRunStatus.CANCELING: "cancelled",
    dg.DagsterRunStatus.CANCELED: "cancelled",
}


def newest_dagster_run(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.DagsterRun | None:
    """The newest Dagster run with these tags."""
    records = instance.get_run_records(dg.RunsFilter(tags=tags), limit=1, order_by="create_timestamp", ascending=False)
    return records[0].dagster_run if records else None


def latest_dagster_run(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    """The newest Dagster run of the training run (a job, a slice, a merge, its candidate)."""
    return newest_dagster_run(instance, {"mloc/run_id": run_id})


def lifecycle(instance: dg.DagsterInstance, run: TrainingRun) -> dict:
    """The run's state in the seed's words, the Dagster run it comes from and its retry count."""
    latest = latest_dagster_run(instance, run.run_id)
    retries = int(latest.tags.get("dagster/retry_number", "0")) if latest else 0
    out = {"dagster_run_id": latest.run_id if latest else None, "retries": retries,
           "dagster_status": latest.status.value if latest else None}
    if run.status != ACTIVE:
        return {"state": run.status, **out}
    if latest is None or latest.status == dg.DagsterRunStatus.SUCCESS:
        return {"state": "scheduled", **out}  # between two jobs: the sensor requests the next
    if latest.status == dg.DagsterRunStatus.FAILURE:
        return {"state": "retrying" if will_retry(instance, latest) else "failed", **out}
    return {"state": WORDS.get(latest.status, latest.status.value.lower()), **out}


def log_tail(instance: dg.DagsterInstance, dagster_run_id: str, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of the run's captured compute logs (stderr, where Dagster's and
    the training loop's log lines go, then stdout), step by step."""
    manager = instance.compute_log_manager
    out: list[str] = []
    for record in instance.all_logs(dagster_run_id, of_type=dg.DagsterEventType.LOGS_CAPTURED):
        file_key = record.dagster_event.logs_captured_data.file_key
        data = manager.get_log_data([dagster_run_id, "compute_logs", file_key])
        for stream in (data.stderr, data.stdout):
            if stream:
                out += stream.decode("utf-8", errors="replace").splitlines()
    return out[-lines:] if lines > 0 else out
