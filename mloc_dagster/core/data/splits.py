"""Deterministic, speaker-disjoint train/dev/test assignment with minimum evaluation speakers.

A speaker's split depends only on the dialect and the speaker id (a hash bucket in [0, 1)): the
top ``test_frac`` of buckets is ``test``, the next ``dev_frac`` is ``dev``. That is stable across
dataset versions — a speaker in ``test`` stays there when more data arrives — and no evaluation
speaker ever leaks into training.

**Minimums.** A speaker bootstrap needs several test speakers, so ``SplitPolicy`` guarantees
``min_test_speakers`` (default 5) and ``min_dev_speakers`` (default 5) by moving the train
speakers with the highest buckets, and then enough of them to reach ``min_eval_rows`` utterances
per evaluation split when row counts are known. Training keeps the majority: the minimums never
give dev + test more than ``max_eval_speaker_frac`` (half) of the speakers, nor, for the row
minimum, more than ``max_eval_row_frac`` of the rows. With too few speakers for every
minimum, **test is served first** (the gate needs it), dev gets at least one speaker from 3
speakers on, train at least one; the shortfall is recorded, never hidden: ``split_report`` says how
many test speakers there are and whether that meets the minimum, the dataset manifest stores it,
and the improvement gate fails with "insufficient evidence: N speakers" below the minimum.

A speaker moved by a minimum sits just below the natural threshold; if many new speakers arrive
later the natural threshold may fill the split without it, and it returns to ``train``. Runs pin a
dataset version, so this never mixes evaluation and training data within one run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SplitPolicy:
    dev_frac: float = 0.15
    test_frac: float = 0.2
    min_test_speakers: int = 5
    min_dev_speakers: int = 5
    min_eval_rows: int = 150  # per evaluation split, when row counts per speaker are given
    max_eval_speaker_frac: float = 0.5  # minimums never give dev + test more speakers than this share
    max_eval_row_frac: float = 0.35  # ... nor, to reach min_eval_rows, more rows than this share

    def to_json(self) -> dict:
        return asdict(self)


def _bucket(dialect: str, speaker: str) -> float:
    digest = hashlib.sha256(f"{dialect}\x00{speaker}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _rows(speakers: Iterable[str] | Mapping[str, object]) -> dict[str, float]:
    """speaker → rows (0 when unknown). Accepts ids, {id: rows} or {id: [rows, seconds]}."""
    if isinstance(speakers, Mapping):
        out = {}
        for s, v in speakers.items():
            n = v[0] if isinstance(v, (list, tuple)) else v
            out[s] = float(n) if isinstance(n, (int, float)) else 0.0
        return out
    return {s: 0.0 for s in speakers}


def assign_splits(dialect: str, speakers: Iterable[str] | Mapping[str, object],
                  policy: SplitPolicy | None = None) -> dict[str, str]:
    """speaker → ``train | dev | test`` under ``policy`` (module docstring).

    ``speakers`` is an iterable of ids or a mapping id → rows (or [rows, seconds], as the dataset
    builder counts them); rows let the minimum of evaluation utterances be met."""
    policy = policy or SplitPolicy()
    rows = _rows(speakers)
    names = sorted(rows)
    n = len(names)
    buckets = {s: _bucket(dialect, s) for s in names}
    out = {}
    for s, b in buckets.items():
        out[s] = ("test" if b >= 1 - policy.test_frac
                  else "dev" if b >= 1 - policy.test_frac - policy.dev_frac else "train")
    if out and all(v != "train" for v in out.values()):  # training needs a speaker
        out[min(names, key=lambda s: buckets[s])] = "train"
    if n < 2:
        return out

    # How many speakers evaluation may take: the natural share, raised to the minimums, capped so
    # that training keeps the majority (and at least one speaker).
    cap = min(n - 1, max(math.floor(n * policy.max_eval_speaker_frac), 2 if n >= 3 else 1))
    test_min = min(policy.min_test_speakers, cap - (1 if n >= 3 else 0))
    by_bucket = sorted(names, key=lambda s: buckets[s], reverse=True)

    def count(split: str) -> tuple[int, float]:
        members = [s for s in names if out[s] == split]
        return len(members), sum(rows[s] for s in members)

    def evaluation_speakers() -> int:
        return sum(v != "train" for v in out.values())

    def promote(split: str) -> bool:
        if evaluation_speakers() >= cap:
            return False
        donor = next((s for s in by_bucket if out[s] == "train"), None)
        if donor is None:
            return False
        out[donor] = split
        return True

    while count("test")[0] < test_min:
        if not promote("test"):  # evaluation is at its cap: test is served before dev
            if count("dev")[0] <= 1:
                break
            out[max((s for s in names if out[s] == "dev"), key=lambda s: buckets[s])] = "test"
    while count("dev")[0] < policy.min_dev_speakers and promote("dev"):
        pass
    if n >= 3 and count("dev")[0] == 0:  # a job evaluates on dev: never leave it empty
        if count("train")[0] > 1:
            out[next(s for s in by_bucket if out[s] == "train")] = "dev"
        else:
            out[min((s for s in names if out[s] == "test"), key=lambda s: buckets[s])] = "dev"
    if any(rows.values()):
        total = sum(rows.values())
        for split in ("test", "dev"):
            while (count(split)[1] < policy.min_eval_rows
                   and count("dev")[1] + count("test")[1] < total * policy.max_eval_row_frac
                   and promote(split)):
                pass
    return out


def split_report(splits: Mapping[str, str], policy: SplitPolicy | None = None) -> dict:
    """What the manifest records about a split: the policy, speakers per split, and whether the
    test split has the minimum number of speakers the gate needs."""
    policy = policy or SplitPolicy()
    per = {s: sum(v == s for v in splits.values()) for s in SPLITS}
    return {"policy": policy.to_json(), "speakers": per, "test_speakers": per["test"],
            "min_test_speakers": policy.min_test_speakers,
            "sufficient_test_speakers": per["test"] >= policy.min_test_speakers}
