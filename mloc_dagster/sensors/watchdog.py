"""dead_worker_sensor: fails the Dagster run of a training job whose worker died on this node.

The embedded default's run launcher (``WarmForkRunLauncher``, like Dagster's DefaultRunLauncher)
does not check run-worker health (only the Kubernetes and Docker launchers do), so a SIGKILLed
worker leaves its run STARTED forever and run retries never fire. The training loop heartbeats
into the state store; a job whose heartbeat is older than the TTL *and* whose worker pid is gone
from this host is dead: we mark its Dagster run failed through the instance, and run retries
start it again from its last intermediate checkpoint.
"""

import os
import socket

import dagster as dg
import psutil

from mloc_dagster.resources.state import StateStoreResource

HEARTBEAT_TTL_S = float(os.environ.get("MLOC_HEARTBEAT_TTL_S", "90"))


def worker_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks the Dagster run of a training job failed when its worker process died "
                       "on this node (stale heartbeat + dead pid), so Dagster's run retries resume it.")
def dead_worker_sensor(context: dg.SensorEvaluationContext, state: StateStoreResource) -> dg.SkipReason:
    store = state.store()
    failed = []
    for job in store.stale_jobs(HEARTBEAT_TTL_S, worker_host=socket.gethostname()):
        if worker_alive(job.worker_pid):
            continue  # slow, not dead: dagster/max_runtime is the backstop for a hung worker
        reason = f"worker pid {job.worker_pid} on {job.worker_host} died (heartbeat older than {HEARTBEAT_TTL_S:.0f} s)"
        if not store.mark_job_failed(job.run_id, job.job_index, reason, if_heartbeat_older_than_s=HEARTBEAT_TTL_S):
            continue
        run = context.instance.get_run_by_id(job.dagster_run_id) if job.dagster_run_id else None
        if run is not None and not run.is_finished:
            context.instance.report_run_failed(run, message=reason)
        failed.append(f"{job.run_id}/{job.job_index}")
        context.log.warning(f"training job {job.run_id}/{job.job_index}: {reason}; Dagster run marked failed")
    return dg.SkipReason(f"failed dead jobs: {', '.join(failed)}" if failed else "no dead training workers")


defs = dg.Definitions(sensors=[dead_worker_sensor])
