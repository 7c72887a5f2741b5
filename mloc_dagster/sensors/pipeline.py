"""The pipeline half of the training chain: a declared sequence of stages, one after another.

A pipeline (run kind ``pipeline``) keeps its stages in its ``spec`` (``core/training/pipeline.py``). Every
tick, for an active pipeline, each stage's state is read from what Dagster and the state store
already record -- nothing is mirrored:

- ``base_model`` / ``candidate`` stage: the Dagster run with tags ``mloc/pipeline`` = the
  pipeline and ``mloc/stage`` = the stage (run key ``<pipeline>/<stage>``): success, in flight, or
  failed for good (Dagster's retries exhausted, or canceled);
- ``training_run`` stage: the training run ``<pipeline>-<stage>`` (``parent_run_id`` = the
  pipeline), advanced by the training chain like any run.

A stage whose ``after`` stages all succeeded starts, with their outputs pinned: a training run
takes the base model its upstream ``base_model`` stage materialized (that run's metadata), a
candidate merges its upstream training run's adapter. A stage that failed stops the pipeline with
the reason; when every stage succeeded the pipeline completes. Pausing, resuming and cancelling
the pipeline apply to its training runs (``runs/service.py``). A spec that fails its checks here
(one written around ``mloc run start``) fails its pipeline alone, with the reason
(``sensors/isolation.py``).
"""

import dagster as dg

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.assets.tracks import pin_hparams
from mloc_dagster.assets.training.adapters import rehearsal_dataset
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, CANCELLED, COMPLETED, FAILED
from mloc_dagster.core.training.pipeline import Stage, load_spec, upstream
from mloc_dagster.runs.lifecycle import newest_dagster_run
from mloc_dagster.runs.pipelines import STAGE_JOBS, check_stage, stage_run_config
from mloc_dagster.runs.verdicts import failure_reason, will_retry

IN_FLIGHT = "in flight"


def stage_run_id(pipeline: TrainingRun, stage: Stage) -> str:
    return f"{pipeline.run_id}-{stage.name}"


def pipeline_requests(context: dg.SensorEvaluationContext, store: StateStore, pipeline: TrainingRun) -> list:
    stages = load_spec(pipeline.spec or {})
    states = {s.name: stage_state(context.instance, store, pipeline, s) for s in stages}
    failed = {name: why for name, why in states.items() if why not in (IN_FLIGHT, "succeeded", "pending")}
    if failed:
        reason = "; ".join(f"stage {name} failed: {why}" for name, why in failed.items())
        store.transition_run(pipeline.run_id, ACTIVE, FAILED, reason[:2000])
        return []
    if all(state == "succeeded" for state in states.values()):
        store.transition_run(pipeline.run_id, ACTIVE, COMPLETED, f"all {len(stages)} stages succeeded")
        return []
    requests = []
    for s in stages:
        if states[s.name] == "pending" and all(states[a] == "succeeded" for a in s.after):
            requests += start_stage(context, store, pipeline, stages, s)
    return requests


def stage_state(instance: dg.DagsterInstance, store: StateStore, pipeline: TrainingRun, stage: Stage) -> str:
    """pending | in flight | succeeded | the reason it failed."""
    if stage.kind == "training_run":
        run = store.get_run(stage_run_id(pipeline, stage))
        if run is None:
            return "pending"
        if run.status == COMPLETED:
            return "succeeded"
        return f"training run {run.run_id} {run.status}: {run.status_reason}" if run.status in (FAILED, CANCELLED) \
            else IN_FLIGHT
    latest = stage_dagster_run(instance, pipeline, stage)
    if latest is None:
        return "pending"
    if latest.status == dg.DagsterRunStatus.SUCCESS:
        return "succeeded"
    if latest.status == dg.DagsterRunStatus.CANCELED:
        return f"Dagster run {latest.run_id[:8]} canceled"
    if latest.status == dg.DagsterRunStatus.FAILURE and not will_retry(instance, latest):
        return f"Dagster run {latest.run_id[:8]}: {failure_reason(instance, latest.run_id)}"
    return IN_FLIGHT


def stage_dagster_run(instance: dg.DagsterInstance, pipeline: TrainingRun, stage: Stage) -> dg.DagsterRun | None:
    return newest_dagster_run(instance, {"mloc/pipeline": pipeline.run_id, "mloc/stage": stage.name})


def start_stage(context: dg.SensorEvaluationContext, store: StateStore, pipeline: TrainingRun,
                stages: list[Stage], stage: Stage) -> list:
    tags = {"mloc/pipeline": pipeline.run_id, "mloc/stage": stage.name}
    key = f"{pipeline.run_id}/{stage.name}"
    check_stage(stage, context.repository_def.get_job)
    if stage.kind == "base_model":
        return [dg.RunRequest(job_name=STAGE_JOBS[stage.kind], run_key=key, tags=tags,
                              run_config=stage_run_config(stage))]
    if stage.kind == "candidate":
        source = store.get_run(stage_run_id(pipeline, upstream(stages, stage, "training_run")))
        return [dg.RunRequest(job_name=STAGE_JOBS[stage.kind], partition_key=source.dialect, run_key=key,
                              tags={**tags, "mloc/run_id": source.run_id}, run_config=stage_run_config(stage))]
    start_training_stage(context, store, pipeline, stages, stage)
    return []


def start_training_stage(context: dg.SensorEvaluationContext, store: StateStore, pipeline: TrainingRun,
                         stages: list[Stage], stage: Stage) -> None:
    """The stage's training run, pinned to its upstream base model (else the latest) and the
    dialect's latest dataset version; the training chain requests its first job."""
    f, instance = stage.fields, context.instance
    base = latest_metadata(instance, "base_model")
    base_stage = upstream(stages, stage, "base_model")
    if base_stage is not None:
        base = materialized_base(instance, stage_dagster_run(instance, pipeline, base_stage))
    dataset = latest_metadata(instance, "dataset_version", f["dialect"])
    if base is None or dataset is None:
        what = "base model" if base is None else f"dataset_version of {f['dialect']}"
        store.transition_run(pipeline.run_id, ACTIVE, FAILED, f"stage {stage.name}: no {what} to train on")
        return
    run = store.create_run(
        run_id=stage_run_id(pipeline, stage), dialect=f["dialect"], dataset_version=dataset["path"],
        base_model_version=base["path"], hparams=pin_hparams(f.get("hparams") or {}), timebox_s=int(f.get("timebox_s", 3600)),
        max_jobs=int(f.get("jobs", 6)), candidate_every=min(12, int(f.get("candidate_every", f.get("jobs", 6)))),
        rehearsal_dataset=rehearsal_dataset(instance, f["dialect"]) or "", parent_run_id=pipeline.run_id)
    context.log.info(f"pipeline {pipeline.run_id}: stage {stage.name} started as {run.run_id} on base "
                     f"{base['path']}")


def materialized_base(instance: dg.DagsterInstance, dagster_run: dg.DagsterRun | None) -> dict | None:
    """What the base_model stage's own Dagster run materialized (its path), not the latest base."""
    if dagster_run is None:
        return None
    for record in instance.all_logs(dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.dagster_event.event_specific_data.materialization
        if materialization.asset_key == dg.AssetKey("base_model"):
            return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    return None
