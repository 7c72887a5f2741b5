"""The demo corpus: deterministic, real espeak audio, held-out sentences never in training."""

import json

import soundfile as sf

from mloc_dagster.core.data.batches import find_batches
from mloc_dagster.core.data.corpus import WORDS, sentence_pools, synth_dialect
from mloc_dagster.core.data.datasets import DatasetVersion, build_version


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


def test_many_distinct_speakers_and_sentences():
    from collections import Counter

    from mloc_dagster.core.data.corpus import DEFAULT_SPEAKERS, TEMPLATES, make_sentences, make_speakers

    speakers = make_speakers("en-gb-scotland", 400, seed=0)
    assert len({s.id for s in speakers}) == 400
    assert len({(s.variant, s.pitch, s.speed, s.word_gap) for s in speakers}) == 400
    default = make_speakers("en-gb-scotland", DEFAULT_SPEAKERS, 0)
    assert len({s.id for s in default}) == DEFAULT_SPEAKERS
    variants = Counter(s.variant for s in default)
    assert len(variants) >= 12 and max(variants.values()) <= 3  # many voices, each at a few settings
    assert make_speakers("en-gb-scotland", DEFAULT_SPEAKERS, 0) == default  # deterministic
    assert {s.variant for s in make_speakers("en-029", DEFAULT_SPEAKERS, 0)} != set(variants)  # per dialect
    sentences = make_sentences(2000, seed=0)
    assert len(set(sentences)) == 2000 and len(TEMPLATES) >= 20
    assert all(set(s.split()) <= set(WORDS) and 3 <= len(s.split()) <= 10 for s in sentences)


def test_demo_sized_corpus_gives_five_dev_and_test_speakers_with_150_utterances(tmp_path):
    from collections import Counter

    from mloc_dagster.core.data.corpus import make_speakers
    from mloc_dagster.core.data.splits import assign_splits

    # the split the dataset builder will make for 1,200 utterances of the default 40 speakers
    voices = make_speakers("en-gb-scotland", 40, 0)
    splits = assign_splits("en-gb-scotland", {v.id: [30, 0.0] for v in voices})
    speakers = Counter(splits.values())
    assert speakers["dev"] >= 5 and speakers["test"] >= 5
    assert speakers["dev"] * 30 >= 150 and speakers["test"] * 30 >= 150
