"""The tiny CTC model as a transformers model, the tokenizer, loading base model directories, features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCTC, Wav2Vec2BertForCTC

from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import collate, default_feature_extractor, load_features
from mloc_dagster.core.models.ctc import CharTokenizer, TinyCtcConfig, TinyCtcForCTC, greedy_ctc_decode, new_tiny_model
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import load_base_model, save_base_model
from mloc_dagster.core.publish import model_dir_hash


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 90, 160, generator=g)
    mask = torch.ones(3, 90, dtype=torch.long)
    mask[1, 61:] = 0
    mask[2, 20:] = 0
    return x, mask


def test_tiny_model_round_trip_through_auto_classes(tmp_path):
    torch.manual_seed(0)
    bm = new_tiny_model()
    bm.model.eval()
    x, mask = _inputs()
    with torch.no_grad():
        before = bm.model(input_features=x, attention_mask=mask).logits
    save_base_model(bm, tmp_path / "m")

    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "vocab.json",
                                                            "preprocessor_config.json"}
    config = AutoConfig.from_pretrained(tmp_path / "m", local_files_only=True)
    assert isinstance(config, TinyCtcConfig) and config.model_type == "mloc-tiny-ctc"
    model = AutoModelForCTC.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    assert isinstance(model, TinyCtcForCTC)
    with torch.no_grad():
        after = model(input_features=x, attention_mask=mask).logits
    # Same weights; the mmapped tensors are not 64-byte aligned, so SIMD sums may differ in the last bit.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bm.model.state_dict().values()))

    loaded = load_base_model(tmp_path / "m")
    with torch.no_grad():  # load_base_model copies weights into owned memory: bit-identical logits
        assert torch.equal(loaded.model(input_features=x, attention_mask=mask).logits, before)
    assert loaded.is_tiny and loaded.tokenizer.vocab == bm.tokenizer.vocab
    assert loaded.feature_extractor.to_dict() == bm.feature_extractor.to_dict()
    assert 1.0e6 < loaded.num_parameters < 1.5e6


def test_forward_ctc_loss_and_batch_independence():
    torch.manual_seed(0)
    model = new_tiny_model().model.eval()
    x, mask = _inputs()
    labels = torch.tensor([[3, 4, 5, 1, 6], [7, 8, -100, -100, -100], [3, 3, -100, -100, -100]])
    out = model(input_features=x, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 45, 29) and torch.isfinite(out.loss)
    # Packed sequences: an utterance's logits do not depend on the padding of its batch.
    with torch.no_grad():
        alone = model(input_features=x[1:2, :61], attention_mask=mask[1:2, :61]).logits
    torch.testing.assert_close(alone[0, :30], out.logits[1, :30].detach(), rtol=0, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_char_tokenizer_and_greedy_decode(tmp_path):
    tok = CharTokenizer.english()
    assert tok.blank_id == 0 and tok.vocab_size == 29
    ids = tok.encode("it's a dog")
    assert tok.decode(ids) == "it's a dog"
    # Greedy CTC: collapse repeats, drop blanks; a blank between repeats keeps both letters.
    seq = [0, 6, 6, 0, 0, 14, 14, 0, 14, 17, 0, 0]  # _ d d _ _ l l _ l o _ _
    logits = torch.nn.functional.one_hot(torch.tensor([seq]), 29).float()
    assert tok.decode(greedy_ctc_decode(logits, [len(seq)], tok.blank_id)[0]) == "dllo"
    assert greedy_ctc_decode(logits, [3], tok.blank_id) == [[6]]
    # The Wav2Vec2CTCTokenizer vocab convention (<pad> blank, | delimiter, <unk>) reads the same way.
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    w2v = CharTokenizer.from_pretrained(tmp_path, blank_id=0)
    assert w2v.encode("ab ba!") == [5, 6, 4, 6, 5, 3]
    assert w2v.decode([5, 6, 4, 3, 6, 1]) == "ab b"


def test_model_dir_hash_tracks_content(tmp_path):
    bm = new_tiny_model()
    save_base_model(bm, tmp_path / "a")
    h1 = model_dir_hash(tmp_path / "a")
    assert model_dir_hash(tmp_path / "a") == h1
    with torch.no_grad():
        bm.model.head.bias.add_(1.0)
    save_base_model(bm, tmp_path / "a")
    assert model_dir_hash(tmp_path / "a") != h1


def test_load_any_local_hf_ctc_checkpoint(tmp_path, corpus):
    """A (tiny, random) Wav2Vec2BertForCTC saved like a Hub checkpoint loads and transcribes offline."""
    from tests.core.models.families import save_tiny_checkpoint

    save_tiny_checkpoint("wav2vec2-bert", tmp_path / "w2v")

    bm = load_base_model(tmp_path / "w2v")
    assert isinstance(bm.model, Wav2Vec2BertForCTC) and not bm.is_tiny
    records = transcribe(bm.model, bm.family, list(DatasetVersion(corpus.scottish).iter_utterances("dev"))[:4],
                         batch_size=2, feature_extractor=bm.feature_extractor)
    assert len(records) == 4 and all(set(r) == {"utt_id", "speaker", "ref", "hyp"} for r in records)

    (tmp_path / "w2v" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_base_model(tmp_path / "w2v")


def test_feature_cache_hit_and_equal_features(corpus, tmp_path):
    dv = DatasetVersion(corpus.scottish)
    first = load_features(dv, "dev", cache_dir=tmp_path)
    second = load_features(dv, "dev", cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert first.utt_ids == second.utt_ids and first.texts == second.texts
    assert torch.equal(first.features, second.features) and torch.equal(first.offsets, second.offsets)
    # Cached rows equal a direct per-utterance call of the extractor.
    fe = default_feature_extractor()
    utt = next(dv.iter_utterances("dev"))
    direct = fe(utt.audio, sampling_rate=16000, return_tensors="np")
    n = int(direct["attention_mask"][0].sum())
    np.testing.assert_allclose(second.item(0).numpy(), direct["input_features"][0, :n], rtol=0, atol=1e-5)
    assert second.item(0).shape[1] == 160
    # A different extractor config is a different cache entry.
    other = load_features(dv, "dev", feature_extractor=type(fe)(feature_size=80, num_mel_bins=80, stride=1),
                          cache_dir=tmp_path)
    assert not other.cache_hit and other.item(0).shape[1] == 80
    stacked = second.item(0).shape[0]  # every 10 ms frame, not none (that extractor's mask is empty)
    assert 2 * stacked <= other.item(0).shape[0] <= 2 * stacked + 3

    batch = collate([second.item(0), second.item(1)], [[3, 4], [5]])
    assert batch["input_features"].shape[0] == 2 and batch["labels"].tolist()[1] == [5, -100]
    assert batch["attention_mask"].sum(-1).tolist() == [second.item(0).shape[0], second.item(1).shape[0]]


def test_error_rates():
    rates = error_rates([{"ref": "the dog", "hyp": "the dog"}, {"ref": "a cat", "hyp": "a bat"}])
    assert rates["cer"] == pytest.approx(1 / 12) and rates["wer"] == pytest.approx(1 / 4)
    assert rates["utterances"] == 2 and rates["ref_words"] == 4
