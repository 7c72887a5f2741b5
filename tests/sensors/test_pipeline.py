"""Pipelines on a real instance and state store: stages start when the stages they wait for
succeeded, with those outputs pinned; a failed stage stops the pipeline with the reason; bad specs
start nothing. The requested Dagster runs are executed in process here (real base registration,
real training steps); the daemon drives the same requests in production."""

import json

import dagster as dg
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.requests import CANDIDATE_JOB
from mloc_dagster.runs.service import TrainingRunError, pause_run, resume_run, start_pipeline
from tests.sensors.conftest import tick


def spec(base_dir, dialect="en-gb-scotland"):
    return {"stages": [
        {"name": "base", "kind": "base_model", "config": {"checkpoint_dir": str(base_dir)}},
        {"name": "adapt", "kind": "training_run", "dialect": dialect, "jobs": 1, "timebox_s": 60,
         "hparams": {"max_steps": 2, "batch_size": 4}},
        {"name": "candidate", "kind": "candidate", "after": ["adapt"]},
    ]}


def execute(instance, request):
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags,
                                  partition_key=request.partition_key, raise_on_error=False)


def drive(instance, store, pipeline, stop_at=None, ticks=12):
    """Tick the sensor and run what it requests, until the pipeline ends or ``stop_at`` is requested."""
    cursor = None
    for _ in range(ticks):
        result, cursor = tick(instance, store, cursor)
        for request in result.run_requests:
            if request.job_name == stop_at:
                return request
            assert execute(instance, request).success
        if store.get_run(pipeline.run_id).status != "active":
            return None
    return None


def test_stages_run_in_order_with_their_outputs_pinned(registered_base, tmp_path):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    from mloc_dagster.core.models.ctc import new_tiny_model
    from mloc_dagster.core.models.families import save_base_model

    fresh = save_base_model(new_tiny_model(), tmp_path / "fresh-base")
    pipeline = start_pipeline(instance, store, json.dumps(spec(fresh)), defs.resolve_job_def)
    assert pipeline.kind == "pipeline" and pipeline.spec["stages"][1]["after"] == ["base"]

    candidate = drive(instance, store, pipeline, stop_at=CANDIDATE_JOB)
    adapt = store.get_run(f"{pipeline.run_id}-adapt")
    assert adapt.status == "completed" and adapt.parent_run_id == pipeline.run_id
    # Pinned to what the base stage materialized (its own run's metadata), not "the latest".
    base_runs = instance.get_run_records(dg.RunsFilter(tags={"mloc/pipeline": pipeline.run_id, "mloc/stage": "base"}))
    assert len(base_runs) == 1 and base_runs[0].dagster_run.status == dg.DagsterRunStatus.SUCCESS
    from mloc_dagster.sensors.pipeline import materialized_base

    assert adapt.base_model_version == materialized_base(instance, base_runs[0].dagster_run)["path"]
    assert candidate is not None and candidate.tags["mloc/run_id"] == adapt.run_id
    assert candidate.partition_key == "en-gb-scotland" and candidate.run_key == f"{pipeline.run_id}/candidate"
    assert store.unclaimed_adapters("en-gb-scotland")  # a pipeline's adapters are not held back


def test_a_failed_stage_stops_the_pipeline_and_pause_applies_to_its_runs(registered_base, tmp_path):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    two = {"stages": [{"name": "adapt", "kind": "training_run", "dialect": "en-gb-scotland", "jobs": 2,
                       "timebox_s": 60, "hparams": {"max_steps": 1, "batch_size": 4}},
                      {"name": "later", "kind": "training_run", "dialect": "en-gb-wales", "jobs": 1}]}
    pipeline = start_pipeline(instance, store, two, defs.resolve_job_def)
    tick(instance, store)
    assert pause_run(store, pipeline.run_id)
    assert store.get_run(f"{pipeline.run_id}-adapt").status == "paused"
    assert resume_run(store, pipeline.run_id)
    drive(instance, store, pipeline)
    done = store.get_run(pipeline.run_id)
    assert done.status == "failed"
    assert done.status_reason == "stage later: no dataset_version of en-gb-wales to train on"
    assert store.get_run(f"{pipeline.run_id}-adapt").status == "completed"


@pytest.mark.parametrize("bad, message", [
    ({"stages": []}, 'non-empty "stages" list'),
    ("stages: [name: a", "neither JSON nor YAML"),
    ({"stages": [{"name": "a", "kind": "base_model", "after": ["b"]},
                 {"name": "b", "kind": "training_run", "dialect": "x", "after": ["a"]}]}, "cycle: a -> b -> a"),
    ({"stages": [{"name": "a", "kind": "candidate", "after": ["nope"]}]}, "unknown stage 'nope'"),
    ({"stages": [{"name": "a", "kind": "deploy"}]}, "kind must be one of"),
    ({"stages": [{"name": "a", "kind": "base_model"}, {"name": "c", "kind": "candidate"}]},
     "exactly one training_run"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "epochs": 3}]}, "unknown field"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "hparams": {"lora_r": 8}}]},
     "stage a: unknown hparam"),
    ({"stages": [{"name": "A b", "kind": "base_model"}]}, "name must be lowercase"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "jobs": 0}]},
     "stage a: jobs must be an integer >= 1, got 0"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "timebox_s": "1h"}]},
     r"stage a: timebox_s must be an integer number of seconds >= 1, got '1h'"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "candidate_every": 13}]},
     r"stage a: candidate_every must be an integer within 1\.\.12, got 13"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x", "hparams": {"lr": 0}}]},
     r"stage a: hparam\(s\) out of range: lr must be > 0"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "X_1"}]}, "stage a: dialect 'X_1'"),
    ({"stages": [{"name": "a", "kind": "training_run", "dialect": "x"},
                 {"name": "c", "kind": "candidate", "config": {"gate_report": {"config": {"bootstrap_samples": "x"}}}}]},
     "stage c: config: Invalid scalar at path root:ops:gate_report:config:bootstrap_samples"),
])
def test_a_bad_spec_starts_nothing(mloc_home, bad, message):
    store = StateStore(resolve_state_url())
    with pytest.raises(TrainingRunError, match=message):
        start_pipeline(dg.DagsterInstance.ephemeral(), store, bad, defs.resolve_job_def)
    assert store.list_runs() == []
