"""The demo corpus: deterministic, real espeak audio, held-out sentences never in training."""

import json

import soundfile as sf

from mloc_dagster.core.corpus import WORDS, sentence_pools, synth_dialect
from mloc_dagster.core.datasets import DatasetVersion, build_version, find_batches


def test_synthesis_is_deterministic_and_real(tmp_path):
    a = synth_dialect("en-gb-x-gbclan", 24, tmp_path / "a", seed=7, speakers=6)
    b = synth_dialect("en-gb-x-gbclan", 24, tmp_path / "b", seed=7, speakers=6)
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({r["speaker"] for r in rows}) == 6
    for r in rows[:3]:
        assert (a / r["audio"]).read_bytes() == (b / r["audio"]).read_bytes()
        audio, sr = sf.read(a / r["audio"])
        assert sr == 22050 and len(audio) / sr > 0.5 and abs(audio).max() > 0.05
        assert 3 <= len(r["text"].split()) <= 10 and set(r["text"].split()) <= set(WORDS)
    assert 200 <= len(set(WORDS)) <= 500


def test_heldout_sentences_only_in_dev_and_test(tmp_path):
    synth_dialect("en-gb-scotland", 120, tmp_path / "incoming", seed=1)
    result = build_version("en-gb-scotland", find_batches(tmp_path / "incoming", "en-gb-scotland"),
                           tmp_path / "ds")
    version = DatasetVersion(result.path)
    train, heldout = sentence_pools(1)
    assert not set(train) & set(heldout)
    train_texts = {u.text for u in version.iter_utterances("train")}
    eval_texts = {u.text for s in ("dev", "test") for u in version.iter_utterances(s)}
    assert train_texts <= set(train) and eval_texts <= set(heldout) and eval_texts
