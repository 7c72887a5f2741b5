"""Every model family through Dagster: raw-waveform CTC checkpoints (tiny ``Wav2Vec2ForCTC`` and
``HubertForCTC``), a log-mel one (``Wav2Vec2BertForCTC``, w2v-BERT 2.0's architecture) and an
encoder-decoder one (a tiny multilingual ``WhisperForConditionalGeneration``), saved like Hub
checkpoints and registered with base_model's checkpoint_dir; a 2-job chained run on each, its
candidate merged and gated; a model the line cannot train is refused at registration, before
anything is copied."""

from __future__ import annotations

import pytest

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.service import StartRequest, start_run
from tests.core.models.families import save_tiny_checkpoint
from tests.ui.world import LENIENT_GATE

DIALECT = "en-gb-scotland"


def register(instance, checkpoint):
    return defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(checkpoint)}}}})


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wav2vec2-bert", "whisper"])
def test_a_base_of_another_family_trains_a_chained_run_to_a_gated_candidate(family, registered_base, mloc_home,
                                                                           tmp_path):
    instance, _ = registered_base
    checkpoint = save_tiny_checkpoint(family, tmp_path / f"{family}-tiny")
    assert register(instance, checkpoint).success
    base = latest_metadata(instance, "base_model")
    assert base["family"] == family and base["version"] == model_dir_hash(checkpoint)
    assert 0 <= base["dev_cer"]  # evaluated with the family's own decoding

    store = StateStore(resolve_state_url())
    run = start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=2, timebox_s=300))
    assert run.base_model_version == base["path"]  # the run pins the registered checkpoint
    for job_index in range(2):
        config = {"run_id": run.run_id, "job_index": job_index, "timebox_s": 300, "max_steps": 3,
                  "batch_size": 4, "warmup_steps": 1}
        result = defs.resolve_job_def("train_adapter_job").execute_in_process(
            partition_key=DIALECT, instance=instance,
            tags={"mloc/run_id": run.run_id, "mloc/job_index": str(job_index)},
            run_config={"ops": {"adapter_checkpoint": {"config": config}}})
        assert result.success
    job1 = latest_metadata(instance, "adapter_checkpoint", DIALECT)
    assert job1["resumed_kind"] == "resume_from" and job1["total_steps"] == 6
    assert job1["base_model"] == base["version"]

    gated = defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=instance, raise_on_error=False,
        run_config={"ops": {"gate_report": {"config": LENIENT_GATE}}})
    assert gated.success, [e.message for e in gated.all_events if e.is_failure]
    [candidate] = store.list_candidates(DIALECT, limit=None)
    assert candidate.base_model == base["version"] and candidate.gate_decision == "passed"
    store.close()


def test_a_family_it_cannot_train_is_refused_at_registration(registered_base, mloc_home, tmp_path):
    instance, _ = registered_base
    before = sorted(p.name for p in (mloc_home / "models" / "base").iterdir())
    refused = register(instance, save_tiny_checkpoint("bert", tmp_path / "bert-tiny"))
    assert not refused.success
    [failure] = [e for e in refused.all_events if e.is_step_failure]
    message = failure.event_specific_data.error.message
    assert "model_type 'bert'" in message and "Supported:" in message and "Wav2Vec2ForCTC" in message
    assert "WhisperForConditionalGeneration" in message
    assert sorted(p.name for p in (mloc_home / "models" / "base").iterdir()) == before  # nothing copied
