"""Slices of a distributed round: exact sample ranges of the run's stream, from a start adapter."""

from __future__ import annotations

import numpy as np
import pytest

from mloc_dagster.core.adapters.format import RESULT_JSON
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.sample_stream import LengthGroupedBatches, SampleStream, check_segments, segment_cursor
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

HP = {"r": 4, "alpha": 8.0, "batch_size": 8, "warmup_steps": 0, "seed": 3}


def test_seek_lands_where_drawing_would():
    drawn = SampleStream(50, seed=1, extra_n=20, extra_per_epoch=10)
    rows = drawn.next_batch(137)
    for position in (0, 7, 59, 60, 61, 136):
        s = SampleStream(50, seed=1, extra_n=20, extra_per_epoch=10)
        s.seek(position)
        assert s.absolute == position
        assert s.next_batch(1) == [rows[position]]


def test_length_grouped_batches_keep_the_streams_rows_and_pad_less():
    """Base pre-training groups rows of similar length: the same rows as the plain stream, group by
    group, in batches that waste far less on padding, in an order that still mixes lengths."""
    lengths = np.random.default_rng(0).integers(40, 250, size=300)
    plain, grouped = SampleStream(300, seed=4), LengthGroupedBatches(SampleStream(300, seed=4), lengths, 8, group=5)
    padding, sorted_groups = {"plain": 0, "grouped": 0}, 0
    for _ in range(3):  # three groups of 5 batches: 40 rows each
        want = [plain.next_batch(8) for _ in range(5)]
        got = [grouped.next_batch() for _ in range(5)]
        assert sorted(sum(got, [])) == sorted(sum(want, []))
        for name, batches in (("plain", want), ("grouped", got)):
            padding[name] += sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)
        longest = [int(lengths[b].max()) for b in got]
        sorted_groups += longest in (sorted(longest), sorted(longest, reverse=True))
    assert padding["grouped"] < 0.3 * padding["plain"]
    assert sorted_groups < 3  # the batches of a group come shuffled, not shortest- or longest-first


def test_segment_cursor_walks_segments_in_order():
    segs = [(10, 14), (100, 102)]
    assert [segment_cursor(segs, d) for d in range(7)] == [
        (10, 4), (11, 3), (12, 2), (13, 1), (100, 2), (101, 1), (-1, 0)]
    assert check_segments([[0, 5], [9, 12]]) == 8
    for bad in ([[5, 5]], [[-1, 3]], [[0, 2, 3]], [[0.5, 2]]):
        with pytest.raises(ValueError, match="segment 0"):
            check_segments(bad)


def test_a_slice_trains_exactly_its_segments_and_a_throttle_slows_it(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    started, ended = [], []
    spec = dict(base_model_dir=base, dataset_version_path=corpus.scottish, timebox_s=600,
                feature_cache_dir=corpus.feature_cache, hparams=AdapterHParams(**HP))
    fast = train_adapter(AdapterJobSpec(
        out_dir=tmp_path / "fast", segments=[(0, 20), (64, 76)], on_train_start=lambda: started.append(1),
        # training is over, evaluation and the save are still to come: the round's deadline stops here
        on_train_end=lambda: ended.append((tmp_path / "fast" / RESULT_JSON).exists()), **spec))
    assert (fast.samples, fast.steps, fast.stop_reason) == (32, 3 + 2, "slice_done")
    assert started == [1]
    assert ended == [False]  # once, before the result was written
    slow = train_adapter(AdapterJobSpec(out_dir=tmp_path / "slow", segments=[(0, 20), (64, 76)], throttle=3.0,
                                        **spec))
    assert slow.samples == 32 and slow.samples_per_s < 0.6 * fast.samples_per_s
    # Same rows, same start: the same adapter whatever the node's speed.
    assert slow.sha256 == fast.sha256
    assert np.isclose(slow.train_loss, fast.train_loss)
