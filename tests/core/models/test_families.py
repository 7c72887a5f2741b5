"""Base model families other than the built-in one, on real espeak data: raw-waveform CTC models
(``Wav2Vec2ForCTC`` as in wav2vec2 / XLS-R / MMS, ``HubertForCTC``) load with their own feature
extractor, train LoRA adapters that resume exactly, and merge; other families are refused with
the list of supported ones. Tiny checkpoints built from configs (``tests/core/models/families.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS
from mloc_dagster.core.adapters.lora import load_adapters
from mloc_dagster.core.data.features import load_features
from mloc_dagster.core.merging.merge import merge_adapters
from mloc_dagster.core.models.ctc import UnsupportedModel, check_family, load_base_model
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec
from tests.core.models.families import save_tiny_checkpoint

HPARAMS = AdapterHParams(r=4, alpha=8.0, batch_size=4, warmup_steps=1, seed=3, lr=3e-3)


def _spec(base: Path, corpus, out: Path, **kw) -> AdapterJobSpec:
    return AdapterJobSpec(base, corpus.scottish, out, timebox_s=600, feature_cache_dir=corpus.feature_cache,
                          hparams=kw.pop("hparams", HPARAMS), **kw)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_a_waveform_ctc_family_trains_resumes_exactly_and_merges(family, corpus, tmp_path):
    base = save_tiny_checkpoint(family, tmp_path / "base")
    assert check_family(base) == family
    bm = load_base_model(base)
    assert bm.model.main_input_name == "input_values" and not bm.model.config.apply_spec_augment
    dev = load_features(corpus.scottish, "dev", bm.feature_extractor, cache_dir=corpus.feature_cache)
    assert dev.features.shape[1] == 1  # the waveform, normalized by the checkpoint's own extractor
    assert len(error_rates(transcribe(bm.model, bm.tokenizer, dev))) > 0

    full = train_adapter(_spec(base, corpus, tmp_path / "full", max_steps=4))
    train_adapter(_spec(base, corpus, tmp_path / "job0", max_steps=2))
    resumed = train_adapter(_spec(base, corpus, tmp_path / "job1", max_steps=2, resume_from=tmp_path / "job0"))
    assert resumed.total_steps == 4 and resumed.loss_history == pytest.approx(full.loss_history[2:], abs=1e-6)
    a, b = load_file(str(tmp_path / "full" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "job1" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact on CPU
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in a} == {"q_proj", "v_proj"}  # the family's targets
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained: B != 0
    assert 0 <= full.dev_cer and full.dev_cer == full.dev_cer

    other = train_adapter(_spec(base, corpus, tmp_path / "other", max_steps=2,
                                hparams=AdapterHParams(**{**HPARAMS.__dict__, "seed": 4})))
    adapters, rejected = load_adapters([tmp_path / "full", other.path])
    assert not rejected
    merged = merge_adapters(adapters, rank=4)
    assert set(merged.lora_a) == set(adapters[0].lora_a) and merged.rank == 4


@pytest.mark.parametrize("family, message", [
    ("whisper", "model_type 'whisper' (WhisperForConditionalGeneration) is not a supported base model family"),
    ("wav2vec2-no-head", "a wav2vec2 checkpoint without a CTC head"),
])
def test_other_families_are_refused_with_the_supported_ones(family, message, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family)
    for attempt in (check_family, load_base_model):
        with pytest.raises(UnsupportedModel) as refused:
            attempt(path)
        assert message in str(refused.value) and "Wav2Vec2ForCTC" in str(refused.value)


def test_the_tts_track_refuses_a_waveform_asr_as_aligner_or_judge(tmp_path):
    from mloc_dagster.core.tts.align import load_frame_asr

    path = save_tiny_checkpoint("wav2vec2", tmp_path / "wav2vec2")
    with pytest.raises(ValueError, match="the TTS judge reads log-mel frames; .* wav2vec2 model on the raw waveform"):
        load_frame_asr(path, role="judge")
