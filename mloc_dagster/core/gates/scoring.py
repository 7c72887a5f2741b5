"""Counting recognition errors, and the bootstrap over speakers (what the gates in
``core/gates/gate.py`` decide on).

Edit counts come from jiwer 4 (``process_characters`` / ``process_words``). Text is compared after
collapsing runs of whitespace and stripping; any further normalization (case, punctuation) is the
caller's, so that the same normalization applies to every model compared. ``bootstrap_over_speakers``
resamples *speakers*, not utterances: utterances of one speaker are correlated (voice, recording),
so resampling utterances would overstate the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jiwer
import numpy as np

__all__ = ["BootstrapResult", "Scores", "SpeakerRow", "UttResult", "aligned", "bootstrap_over_speakers",
           "index_utts", "score", "score_with_counts"]

_CHARS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfChars()])
_WORDS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])


@dataclass(frozen=True)
class UttResult:
    """One test utterance as recognized by one model."""

    utt_id: str
    speaker: str
    ref: str
    hyp: str


@dataclass(frozen=True)
class Scores:
    """Corpus-level error rates of one model on one utterance set."""

    n_utts: int
    char_edits: int
    ref_chars: int
    word_edits: int
    ref_words: int

    @property
    def cer(self) -> float:
        return self.char_edits / max(self.ref_chars, 1)

    @property
    def wer(self) -> float:
        return self.word_edits / max(self.ref_words, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cer": self.cer, "wer": self.wer}


@dataclass(frozen=True)
class SpeakerRow:
    speaker: str
    n_utts: int
    ref_chars: int
    cer_candidate: float
    cer_production: float | None


@dataclass(frozen=True)
class BootstrapResult:
    samples: int
    seed: int
    n_speakers: int
    p_better: float  # share of resamples where candidate CER < production CER
    diff: float  # candidate CER - production CER on the full set (negative = better)
    ci_low: float  # 95 % percentile interval of the resampled difference
    ci_high: float


# --------------------------------------------------------------------------------------------
# Counting errors


def _edit_counts(results: Sequence[UttResult], transform: jiwer.Compose) -> tuple[np.ndarray, np.ndarray]:
    """Per utterance: (substitutions + deletions + insertions, reference length)."""
    out = jiwer.process_words(
        [r.ref for r in results], [r.hyp for r in results],
        reference_transform=transform, hypothesis_transform=transform,
    )
    edits = np.zeros(len(results), dtype=np.int64)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            if c.type in ("substitute", "delete"):
                edits[i] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                edits[i] += c.hyp_end_idx - c.hyp_start_idx
    ref_len = np.array([len(ref) for ref in out.references], dtype=np.int64)
    return edits, ref_len


def index_utts(results: Sequence[UttResult], what: str) -> dict[str, UttResult]:
    by_id: dict[str, UttResult] = {}
    for r in results:
        if r.utt_id in by_id:
            raise ValueError(f"{what}: utterance {r.utt_id!r} appears twice")
        by_id[r.utt_id] = r
    return by_id


def aligned(reference: Sequence[UttResult], other: Sequence[UttResult], what: str) -> list[UttResult]:
    """``other`` in the order of ``reference``; both must cover exactly the same utterances,
    or the comparison would measure the test sets rather than the models."""
    ref_ids = index_utts(reference, what)
    other_ids = index_utts(other, what)
    if ref_ids.keys() != other_ids.keys():
        missing = sorted(ref_ids.keys() - other_ids.keys())[:5]
        extra = sorted(other_ids.keys() - ref_ids.keys())[:5]
        raise ValueError(f"{what}: utterance sets differ (missing e.g. {missing}, extra e.g. {extra})")
    return [other_ids[r.utt_id] for r in reference]


def score_with_counts(results: Sequence[UttResult]) -> tuple[Scores, np.ndarray, np.ndarray]:
    """Scores plus the per-utterance character edits and reference lengths behind them."""
    if not results:
        raise ValueError("no utterances to score")
    char_edits, ref_chars = _edit_counts(results, _CHARS)
    word_edits, ref_words = _edit_counts(results, _WORDS)
    if ref_chars.sum() == 0:
        raise ValueError("all references are empty")
    scores = Scores(len(results), int(char_edits.sum()), int(ref_chars.sum()), int(word_edits.sum()),
                    int(ref_words.sum()))
    return scores, char_edits, ref_chars


def score(results: Sequence[UttResult]) -> Scores:
    """Corpus-level CER and WER (total edits / total reference length)."""
    return score_with_counts(results)[0]


def bootstrap_over_speakers(
    speakers: Sequence[str],
    cand_edits: np.ndarray,
    prod_edits: np.ndarray,
    ref_len: np.ndarray,
    samples: int,
    seed: int,
) -> BootstrapResult:
    """Resample speakers with replacement; per resample compare corpus CERs.

    Inputs are per utterance; they are summed per speaker first, so a resample is a vector of
    speaker counts (multinomial) and every statistic a dot product -- 2000 resamples cost
    milliseconds whatever the number of utterances.
    """
    names = sorted(set(speakers))
    pos = {s: i for i, s in enumerate(names)}
    idx = np.array([pos[s] for s in speakers])
    per_spk = [np.bincount(idx, weights=v, minlength=len(names)) for v in (cand_edits, prod_edits, ref_len)]
    cand, prod, ref = per_spk
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=samples)
    ref_tot = np.maximum(counts @ ref, 1.0)
    diffs = (counts @ cand - counts @ prod) / ref_tot
    full = (cand.sum() - prod.sum()) / max(ref.sum(), 1.0)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return BootstrapResult(samples=samples, seed=seed, n_speakers=len(names), p_better=float(np.mean(diffs < 0)),
                           diff=float(full), ci_low=float(low), ci_high=float(high))
