"""Transcribe utterances with a base model (any family) and score them (CER/WER with jiwer 4).

``transcribe`` returns one record per utterance (``utt_id``, ``speaker``, ``ref``, ``hyp``) so the
gate can bootstrap over speakers; ``error_rates`` aggregates records into corpus-level rates
(errors summed over all utterances, divided by reference length: the usual CER/WER, not a mean of
per-utterance rates).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jiwer
import torch

from mloc_dagster.core.data.datasets import Utterance
from mloc_dagster.core.data.features import FeatureSet, collate, compute_features
from mloc_dagster.core.models.base import Family


@torch.inference_mode()
def transcribe(model: torch.nn.Module, family: Family, utterances: FeatureSet | Iterable[Utterance],
               batch_size: int = 32, device: str | torch.device = "cpu",
               feature_extractor=None, dialect: str | None = None) -> list[dict[str, str]]:
    """Transcripts by the family's decoding (greedy CTC; Whisper's ``generate``), in the order of
    ``utterances``.

    ``utterances`` is a ``FeatureSet`` (precomputed, e.g. from the feature cache) or an iterable of
    ``Utterance`` (features computed here with ``feature_extractor``, default the w2v-BERT front end).
    ``dialect`` (default: the feature set's) is what a seq2seq model is told its language is.
    Batches are formed from utterances of similar length, which makes padding cheap; the result does
    not depend on batching (the tiny model packs sequences).
    """
    fs = utterances if isinstance(utterances, FeatureSet) else compute_features(utterances, feature_extractor)
    dialect = dialect or fs.dialect
    was_training = model.training
    model.eval()
    lengths = fs.lengths.tolist()
    order = sorted(range(len(fs)), key=lambda i: lengths[i])
    hyps: dict[int, str] = {}
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([fs.item(i) for i in idx])
            mask = batch["attention_mask"].to(device)
            for i, hyp in zip(idx, family.decode(model, batch["input_features"].to(device), mask, dialect)):
                hyps[i] = hyp
    finally:
        model.train(was_training)
    return [{"utt_id": fs.utt_ids[i], "speaker": fs.speakers[i], "ref": fs.texts[i], "hyp": hyps[i]}
            for i in range(len(fs))]


def error_rates(records: Sequence[dict[str, str]]) -> dict[str, float | int]:
    """Corpus CER and WER of transcription records (``ref``/``hyp``), plus the counts behind them."""
    if not records:
        return {"cer": float("nan"), "wer": float("nan"), "utterances": 0, "ref_chars": 0, "ref_words": 0}
    refs = [r["ref"] for r in records]
    hyps = [r["hyp"] for r in records]
    chars = jiwer.process_characters(refs, hyps)
    words = jiwer.process_words(refs, hyps)
    return {
        "cer": float(chars.cer), "wer": float(words.wer), "utterances": len(records),
        "ref_chars": chars.hits + chars.substitutions + chars.deletions,
        "ref_words": words.hits + words.substitutions + words.deletions,
        "char_substitutions": chars.substitutions, "char_deletions": chars.deletions,
        "char_insertions": chars.insertions,
        "word_substitutions": words.substitutions, "word_deletions": words.deletions,
        "word_insertions": words.insertions,
    }
