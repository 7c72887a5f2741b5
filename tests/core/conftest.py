"""Real espeak-ng data and a briefly pre-trained tiny base model, shared by the core ML tests.

Budgets are in steps, not seconds, so the tests assert the same things on a busy machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mloc_dagster.core.data.batches import find_batches
from mloc_dagster.core.data.corpus import synth_dialect
from mloc_dagster.core.data.datasets import build_version
from tests.world import build_once

PRETRAIN_STEPS = 150


@dataclass(frozen=True)
class Corpus:
    root: Path
    en_us: Path  # dataset version dirs
    scottish: Path
    feature_cache: Path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, worker_id) -> Corpus:
    def build(root: Path) -> dict:
        versions = {}
        for dialect, n in (("en-us", 300), ("en-gb-scotland", 200)):
            synth_dialect(dialect, n, root / "incoming", seed=0)
            versions[dialect] = str(build_version(dialect, find_batches(root / "incoming", dialect),
                                                  root / "datasets" / dialect).path)
        return versions

    root, versions = build_once(tmp_path_factory, worker_id, "ml-corpus", build)
    return Corpus(root, Path(versions["en-us"]), Path(versions["en-gb-scotland"]), root / "features")


@pytest.fixture(scope="session")
def pretrained_base(corpus, tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """The tiny model pre-trained for PRETRAIN_STEPS steps on en-us: far from converged, but it
    transcribes (CER well below 1), so adaptation has something to improve."""
    from mloc_dagster.core.models.pretrain import pretrain_base

    def build(out: Path) -> dict:
        return pretrain_base(corpus.en_us, out / "base", train_seconds=900, max_steps=PRETRAIN_STEPS, seed=0,
                             feature_cache_dir=corpus.feature_cache)

    out, metrics = build_once(tmp_path_factory, worker_id, "ml-base", build)
    return out / "base", metrics


class FakeClock:
    """The state store's clock in tests (stale heartbeats, daily quotas, TTLs)."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 23, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(state_url: str, clock: FakeClock) -> Iterator:
    """A state store on SQLite and on a real PostgreSQL (``state_url``), with a fake clock."""
    from mloc_dagster.core.state import StateStore

    s = StateStore(state_url, clock=clock)
    yield s
    s.close()
