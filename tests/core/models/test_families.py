"""Base model families other than the built-in one, on real espeak data: raw-waveform CTC models
(``Wav2Vec2ForCTC`` as in wav2vec2 / XLS-R / MMS, ``HubertForCTC``) and the encoder-decoder
``WhisperForConditionalGeneration`` load with their own feature extractor (and tokenizer), train LoRA
adapters that resume exactly, and merge; other models are refused with the list of supported
families. Tiny checkpoints built from configs (``tests/core/models/families.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS
from mloc_dagster.core.adapters.lora import load_adapters
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import collate, compute_features, load_features
from mloc_dagster.core.merging.merge import merge_adapters
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import UnsupportedModel, check_family, load_base_model
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.runtime import cpu_threads
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec
from tests.core.models.families import save_tiny_checkpoint

HPARAMS = AdapterHParams(r=4, alpha=8.0, batch_size=4, warmup_steps=1, seed=3, lr=3e-3)


def _spec(base: Path, corpus, out: Path, **kw) -> AdapterJobSpec:
    return AdapterJobSpec(base, corpus.scottish, out, timebox_s=600, feature_cache_dir=corpus.feature_cache,
                          hparams=kw.pop("hparams", HPARAMS), **kw)


# What each family reads (its model input, the values per cached row: the waveform normalized by the
# checkpoint's own extractor, w2v-BERT's stacked log-mel, Whisper's 80 log-mel bins), and its default
# LoRA targets.
READS = {"wav2vec2": ("input_values", 1, {"q_proj", "v_proj"}), "hubert": ("input_values", 1, {"q_proj", "v_proj"}),
         "wav2vec2-bert": ("input_features", 160, {"linear_q", "linear_v"}),
         "whisper": ("input_features", 80, {"q_proj", "v_proj"})}


@pytest.mark.parametrize("family", list(READS))
def test_a_family_trains_resumes_exactly_and_merges(family, corpus, tmp_path):
    base = save_tiny_checkpoint(family, tmp_path / "base")
    assert check_family(base) == family
    bm = load_base_model(base)
    assert bm.model.main_input_name == READS[family][0] and not getattr(bm.model.config, "apply_spec_augment", False)
    dev = load_features(corpus.scottish, "dev", bm.feature_extractor, cache_dir=corpus.feature_cache)
    assert dev.features.shape[1] == READS[family][1] and dev.dialect == "en-gb-scotland"
    assert len(error_rates(transcribe(bm.model, bm.family, dev))) > 0

    full = train_adapter(_spec(base, corpus, tmp_path / "full", max_steps=4))
    train_adapter(_spec(base, corpus, tmp_path / "job0", max_steps=2))
    resumed = train_adapter(_spec(base, corpus, tmp_path / "job1", max_steps=2, resume_from=tmp_path / "job0"))
    assert resumed.total_steps == 4 and resumed.loss_history == pytest.approx(full.loss_history[2:], abs=1e-6)
    a, b = load_file(str(tmp_path / "full" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "job1" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact on CPU
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in a} == READS[family][2]  # the family's targets
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained: B != 0
    assert 0 <= full.dev_cer and full.dev_cer == full.dev_cer

    other = train_adapter(_spec(base, corpus, tmp_path / "other", max_steps=2,
                                hparams=AdapterHParams(**{**HPARAMS.__dict__, "seed": 4})))
    adapters, rejected = load_adapters([tmp_path / "full", other.path])
    assert not rejected
    merged = merge_adapters(adapters, rank=4)
    assert set(merged.lora_a) == set(adapters[0].lora_a) and merged.rank == 4


@pytest.mark.parametrize("family, message", [
    ("bert", "model_type 'bert' (BertForMaskedLM) is not a supported base model family"),
    ("wav2vec2-no-head", "a wav2vec2 checkpoint without its *ForCTC head"),
])
def test_other_families_are_refused_with_the_supported_ones(family, message, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family)
    for attempt in (check_family, load_base_model):
        with pytest.raises(UnsupportedModel) as refused:
            attempt(path)
        assert message in str(refused.value) and "Wav2Vec2ForCTC" in str(refused.value)
        assert "WhisperForConditionalGeneration" in str(refused.value)


@pytest.mark.parametrize("family, reads", [("wav2vec2", "input_values"), ("whisper", "input_features")])
def test_the_tts_aligner_refuses_an_asr_without_ctc_frames(family, reads, tmp_path):
    from mloc_dagster.core.tts.align import load_frame_asr

    path = save_tiny_checkpoint(family, tmp_path / family)
    with pytest.raises(ValueError, match=f"the TTS aligner reads log-mel frames and CTC outputs per frame; .* "
                                         f"{family} model on {reads}"):
        load_frame_asr(path)


def test_any_family_can_judge_tts_audio(corpus, tmp_path):
    """The judge hears waveforms through its own extractor and decoding: a Whisper judge back-recognizes."""
    from mloc_dagster.core.tts.judge import JudgeSpec, back_recognize, load_judge

    path = save_tiny_checkpoint("whisper", tmp_path / "whisper")
    judge = load_judge(JudgeSpec.pin(path), tmp_path / "candidate")
    utts = list(DatasetVersion(corpus.scottish).iter_utterances("dev"))[:3]
    heard = back_recognize(judge, [u.audio for u in utts], [u.text for u in utts], dialect="en-gb-scotland")
    assert len(heard["records"]) == 3 and heard["cer"] >= 0 and heard["judge_version"] == judge.spec.version


def test_whisper_reads_the_extractors_window_and_the_dialects_language(corpus, tmp_path):
    """The cached rows padded back are exactly the extractor's 30 s-style window; labels carry the
    dialect's language and task tokens, and a dialect whose language the checkpoint lacks is refused."""
    from tests.core.models.families import save_tiny_whisper

    bm = load_base_model(save_tiny_checkpoint("whisper", tmp_path / "whisper"))
    utts = list(DatasetVersion(corpus.scottish).iter_utterances("dev"))[:4]
    fs = compute_features(utts, bm.feature_extractor)
    batch = collate([fs.item(i) for i in range(len(fs))])
    own = bm.feature_extractor([u.audio for u in utts], sampling_rate=16_000, return_tensors="pt")["input_features"]
    assert torch.allclose(bm.family.encoder_inputs(batch["input_features"], batch["attention_mask"]), own, atol=1e-6)

    ids = bm.tokenizer.convert_tokens_to_ids
    labels = bm.family.labels("hello world", "en-gb-scotland")
    assert labels[:4] == ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert labels[-1] == ids("<|endoftext|>") and bm.tokenizer.decode(labels[4:-1]) == "hello world"
    with pytest.raises(ValueError, match=r"dialect 'qq-x': the checkpoint has no language token <\|qq\|>"):
        bm.family.labels("hello", "qq-x")

    english_only = load_base_model(save_tiny_whisper(tmp_path / "whisper-en", multilingual=False))
    assert english_only.family.labels("hi", "qq-x")[:2] == english_only.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"])  # no language or task tokens to give


def test_whisper_decodes_what_its_training_labels_teach(corpus, tmp_path):
    """Teacher-forced steps on two utterances until the model knows them; ``generate`` (told the
    language and task) then decodes exactly those transcripts: the training labels (prefix given,
    text and end predicted) and the decoding agree, token for token."""
    bm = load_base_model(save_tiny_checkpoint("whisper", tmp_path / "whisper"))
    utts = list(DatasetVersion(corpus.scottish).iter_utterances("dev"))[:2]
    fs = compute_features(utts, bm.feature_extractor)
    batch = collate([fs.item(i) for i in range(2)], [bm.family.labels(u.text, "en-gb-scotland") for u in utts])
    torch.manual_seed(0)
    model = bm.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with cpu_threads(1):  # as a job on a small model: no oversubscription beside parallel test workers
        for _ in range(150):
            loss = bm.family.forward(model, batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert loss.item() < 0.05
    hyps = bm.family.decode(model, batch["input_features"], batch["attention_mask"], "en-gb-scotland")
    assert hyps == [u.text for u in utts]
