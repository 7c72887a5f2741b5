"""Publication through Dagster (core/publish.py): a production adapter appears whole (a half copy
left by a crash is rebuilt, not trusted), and a candidate's id never collides with another's, so
no candidate directory is overwritten."""

import re
import shutil
import uuid

import dagster as dg
import pytest

from mloc_dagster.core.publish import model_dir_hash, unique_id
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.core.state.schema import ASR, TTS
from mloc_dagster.definitions import defs
from mloc_dagster.runs.service import StartRequest, start_run

DIALECT = "en-gb-scotland"


def fake_adapter(root):
    """Promotion copies bytes; what they are does not matter here."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 4}')
    (root / "adapter_model.safetensors").write_bytes(uuid.uuid4().bytes * 4096)
    return root


@pytest.mark.parametrize(("track", "job", "asset", "production"), [
    (ASR, "candidate_job", "production_adapter", ("production",)),
    (TTS, "tts_candidate_job", "tts_production_adapter", ("production", "tts")),
])
def test_a_half_production_copy_is_rebuilt_not_trusted(mloc_home, track, job, asset, production):
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("dialect", [DIALECT])
    store = StateStore(resolve_state_url())
    adapter = fake_adapter(mloc_home / "candidates" / DIALECT / "cand-x")
    run_id = str(uuid.uuid4())  # the candidate_job run that merged and gated it
    candidate = store.record_candidate(candidate_id=unique_id("cand"), dialect=DIALECT, adapter_path=str(adapter),
                                       sha256="c" * 64, sources=[], trusted=True, dagster_run_id=run_id, track=track)
    store.set_gate_result(candidate.candidate_id, "passed", None)
    half = mloc_home.joinpath("adapters", *production, DIALECT, "stable", candidate.candidate_id)
    half.mkdir(parents=True)
    shutil.copy(adapter / "adapter_config.json", half)  # the old copytree died after the first file

    result = defs.resolve_job_def(job).execute_in_process(
        partition_key=DIALECT, instance=instance, run_id=run_id, raise_on_error=False,
        asset_selection=[dg.AssetKey(asset)])
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    md = result.asset_materializations_for_node(asset)[0].metadata
    assert md["path"].value == str(half) and model_dir_hash(half) == model_dir_hash(adapter)
    assert sorted(p.name for p in half.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert store.production(DIALECT, "stable", track).candidate_id == candidate.candidate_id
    store.close()
    instance.dispose()


def test_a_candidate_never_takes_an_existing_candidates_name(registered_base, mloc_home):
    """Ids were ``cand-<first 8 characters of the Dagster run id>``: a run sharing them overwrote
    the other candidate's directory, then failed on the database insert. Now: a fresh 128-bit id."""
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=300))
    config = {"run_id": run.run_id, "job_index": 0, "timebox_s": 300, "max_steps": 2, "batch_size": 8,
              "warmup_steps": 1}
    assert defs.resolve_job_def("train_adapter_job").execute_in_process(
        partition_key=DIALECT, instance=instance, tags={"mloc/run_id": run.run_id, "mloc/job_index": "0"},
        run_config={"ops": {"adapter_checkpoint": {"config": config}}}).success

    dagster_run_id = str(uuid.uuid4())
    earlier = fake_adapter(mloc_home / "candidates" / DIALECT / f"cand-{dagster_run_id[:8]}")
    before = model_dir_hash(earlier)
    store.record_candidate(candidate_id=earlier.name, dialect=DIALECT, adapter_path=str(earlier), sha256="e" * 64,
                           sources=[], trusted=True)

    result = defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=instance, run_id=dagster_run_id, raise_on_error=False,
        tags={"mloc/run_id": run.run_id}, asset_selection=[dg.AssetKey("merged_candidate")])
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    merged = result.asset_materializations_for_node("merged_candidate")[0].metadata
    new_id = merged["candidate_id"].value
    assert re.fullmatch(r"cand-[0-9a-f]{32}", new_id) and new_id != earlier.name
    assert merged["path"].value == str(mloc_home / "candidates" / DIALECT / new_id)
    assert model_dir_hash(earlier) == before  # the earlier candidate's directory is untouched
    assert store.get_candidate(earlier.name).adapter_path == str(earlier)
    assert store.candidate_of_dagster_run(dagster_run_id).candidate_id == new_id
    store.close()
