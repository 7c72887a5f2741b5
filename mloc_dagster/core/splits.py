"""Deterministic, speaker-disjoint train/dev/test assignment.

A speaker's split depends only on the dialect and the speaker id (a hash bucket), so it is stable
across dataset versions: a speaker that was in ``test`` stays there when more data arrives, and
no evaluation speaker ever leaks into training. Small speaker sets get at least one dev and two
test speakers (the highest buckets are moved), so a demo dialect is always evaluable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLITS = ("train", "dev", "test")


def _bucket(dialect: str, speaker: str) -> float:
    digest = hashlib.sha256(f"{dialect}\x00{speaker}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(dialect: str, speakers: Iterable[str], dev_frac: float = 0.1,
                  test_frac: float = 0.2) -> dict[str, str]:
    speakers = sorted(set(speakers))
    buckets = {s: _bucket(dialect, s) for s in speakers}
    out = {}
    for s, b in buckets.items():
        out[s] = "test" if b >= 1 - test_frac else "dev" if b >= 1 - test_frac - dev_frac else "train"
    # Minimums: a bootstrap over speakers needs more than one test speaker.
    minimum = {"test": 2, "dev": 1} if len(speakers) >= 6 else {"test": 1, "dev": 1} if len(speakers) >= 3 else {}
    by_bucket = sorted(speakers, key=lambda s: buckets[s], reverse=True)
    for split, n in minimum.items():
        while sum(v == split for v in out.values()) < n:
            donor = next(s for s in by_bucket if out[s] == "train")
            out[donor] = split
    return out
