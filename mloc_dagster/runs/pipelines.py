"""A pipeline's stages as Dagster runs: the job each stage kind starts, its run config, and the
checks only the Dagster layer can make. Used when a pipeline starts (``runs/service.py``) and
before each stage starts (``sensors/pipeline.py``)."""

from collections.abc import Callable

import dagster as dg

from mloc_dagster.assets.tracks import validate_hparams
from mloc_dagster.assets.training.hparams import InvalidHParams
from mloc_dagster.core.training.pipeline import PipelineSpecError, Stage
from mloc_dagster.partitions import is_valid_dialect
from mloc_dagster.runs.requests import CANDIDATE_JOB

JobResolver = Callable[[str], dg.JobDefinition]

STAGE_JOBS = {"base_model": "base_model_job", "candidate": CANDIDATE_JOB}


def stage_run_config(stage: Stage) -> dict:
    config = dict(stage.fields.get("config") or {})
    return {"ops": {"base_model": {"config": config}}} if stage.kind == "base_model" else {"ops": config}


def check_stage(stage: Stage, job_def: JobResolver) -> None:
    """What only the Dagster layer can check, as a ``PipelineSpecError`` naming the stage: a
    training stage's dialect key and hparams, a job stage's run config against its job. Checked
    when the pipeline starts and again before the stage starts (a spec stored around the start
    must fail its pipeline, not the sensor's tick). ``job_def`` finds a job by name: the sensor's
    repository, or the code location's ``Definitions`` for the CLI."""
    if stage.kind == "training_run":
        if not is_valid_dialect(stage.fields["dialect"]):
            raise PipelineSpecError(f"stage {stage.name}: dialect {stage.fields['dialect']!r}: dialect keys are "
                                    "lowercase [a-z0-9-]")
        try:
            validate_hparams(stage.fields.get("hparams") or {})
        except InvalidHParams as exc:
            raise PipelineSpecError(f"stage {stage.name}: {exc}") from exc
        return
    try:
        dg.validate_run_config(job_def(STAGE_JOBS[stage.kind]), stage_run_config(stage))
    except dg.DagsterInvalidConfigError as exc:
        errors = "; ".join(e.message for e in exc.errors) or str(exc)
        raise PipelineSpecError(f"stage {stage.name}: config: {errors}") from exc
