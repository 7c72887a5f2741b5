"""Starting, pausing, resuming and cancelling training runs: shared by the `mloc run` CLI and the
`start_training_run` job of the UI launchpad."""


import dagster as dg

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.core.state import ACTIVE, CANCELLED, PAUSED, QUEUED, RUNNING, StateStore, TrainingRun
from mloc_dagster.partitions import is_valid_dialect
from mloc_dagster.resources.state import StateStoreResource

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


class TrainingRunError(ValueError):
    pass


def start_run(instance: dg.DagsterInstance, store: StateStore, dialect: str, jobs: int = 6,
              candidate_every: int = 6, timebox_s: int = 3600, hparams: dict | None = None) -> TrainingRun:
    """Pin the dialect's latest dataset version and the latest base model, and create the run.
    The training_chain_sensor launches its first job on its next tick."""
    if not is_valid_dialect(dialect):
        raise TrainingRunError(f"{dialect!r}: dialect keys are lowercase [a-z0-9-]")
    dataset = latest_metadata(instance, "dataset_version", dialect)
    if dataset is None:
        raise TrainingRunError(f"dialect {dialect} has no dataset_version yet: add incoming data first")
    base = latest_metadata(instance, "base_model")
    if base is None:
        raise TrainingRunError("no base_model yet: materialize base_model first")
    return store.create_run(dialect=dialect, dataset_version=dataset["path"], base_model_version=base["path"],
                            hparams=hparams or {}, timebox_s=timebox_s, max_jobs=jobs,
                            candidate_every=min(candidate_every, 12))


def pause_run(store: StateStore, run_id: str) -> bool:
    """The job in flight finishes; no next job is requested."""
    return store.transition_run(run_id, ACTIVE, PAUSED, "paused by user")


def resume_run(store: StateStore, run_id: str) -> bool:
    """The next job resumes from the last checkpoint."""
    return store.transition_run(run_id, PAUSED, ACTIVE, None)


def cancel_run(instance: dg.DagsterInstance, store: StateStore, run_id: str) -> list[str]:
    """Cancel the run and terminate its Dagster runs in flight; returns their ids."""
    store.transition_run(run_id, (ACTIVE, PAUSED), CANCELLED, "cancelled by user")
    for job in store.jobs_for_run(run_id):
        if job.status in (QUEUED, RUNNING):
            store.mark_job_failed(run_id, job.job_index, "cancelled by user")
    terminated = []
    for record in instance.get_run_records(dg.RunsFilter(tags={"mloc/run_id": run_id}, statuses=IN_FLIGHT)):
        run = record.dagster_run
        # A run not started yet is simply cancelled; a started one is terminated by its launcher.
        # If the launcher cannot reach it, the worker still stops at its next heartbeat (the job
        # is marked failed above) and the run is recorded as cancelled here.
        if run.status not in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED) and \
                instance.run_coordinator.cancel_run(run.run_id):
            terminated.append(run.run_id)
            continue
        instance.report_run_canceled(run, message="cancelled by `mloc run cancel`")
        terminated.append(run.run_id)
    return terminated


class StartRunConfig(dg.Config):
    dialect: str
    jobs: int = 6
    candidate_every: int = 6
    timebox_s: int = 3600
    hparams: dict[str, float] = {}


@dg.op(description="Create a training run; the training_chain_sensor then chains its jobs.")
def create_training_run(context: dg.OpExecutionContext, config: StartRunConfig,
                        state: StateStoreResource) -> str:
    try:
        run = start_run(context.instance, state.store(), config.dialect, config.jobs, config.candidate_every,
                        config.timebox_s, dict(config.hparams))
    except TrainingRunError as exc:
        raise dg.Failure(str(exc)) from exc
    context.add_output_metadata({"run_id": run.run_id, "dialect": run.dialect, "jobs": run.max_jobs})
    context.log.info(f"training run {run.run_id} started for {run.dialect}")
    return run.run_id


@dg.job(description="Start a training run from the UI launchpad (same as `mloc run start`).")
def start_training_run():
    create_training_run()


defs = dg.Definitions(jobs=[start_training_run])
