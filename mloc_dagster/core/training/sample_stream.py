"""The data order of a training run, exact to the sample, and turning rows into a batch.

Both training loops (base pre-training and adapter jobs) draw batches from a ``SampleStream``.
Its position — (epoch, index within the epoch, permutation seed, row counts) — is a small dict
saved with every adapter checkpoint, so a resumed job continues with exactly the next sample.
"""

from __future__ import annotations

import numpy as np

from mloc_dagster.core.data.features import FeatureSet, collate


class SampleStream:
    """The data order, position exact to the sample.

    Epoch ``e`` visits every one of the ``n`` training rows once, plus ``extra_per_epoch`` rehearsal
    rows (indices ``n + j``) chosen by ``permutation(default_rng([seed, e, 1]))`` from ``extra_n``,
    all in the order ``permutation(default_rng([seed, e]))``. A batch takes the next ``batch_size``
    rows of this endless stream (crossing epoch boundaries). Depends on no global RNG, so
    (epoch, index, seed) is the whole position.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0, extra_n: int = 0,
                 extra_per_epoch: int = 0):
        if n <= 0:
            raise ValueError("no training rows")
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.extra_n, self.extra_per_epoch = extra_n, (extra_per_epoch if extra_n else 0)
        self._order = self._epoch_order(epoch)

    @classmethod
    def from_position(cls, d: dict) -> SampleStream:
        return cls(d["rows"], d["perm_seed"], d["epoch"], d["index"], d.get("extra_rows", 0),
                   d.get("extra_per_epoch", 0))

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rows = np.arange(self.n)
        if self.extra_per_epoch:
            pick = np.random.default_rng([self.seed, epoch, 1]).permutation(self.extra_n)
            pick = np.resize(pick, self.extra_per_epoch)  # repeats only if asked for more than exist
            rows = np.concatenate([rows, self.n + pick])
        return rows[np.random.default_rng([self.seed, epoch]).permutation(len(rows))]

    def next_batch(self, batch_size: int) -> list[int]:
        out: list[int] = []
        while len(out) < batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(batch_size - len(out), len(self._order) - self.index)
            out.extend(int(i) for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    @property
    def epoch_len(self) -> int:
        return self.n + self.extra_per_epoch

    @property
    def absolute(self) -> int:
        """The position as one number: samples drawn since the start of epoch 0."""
        return self.epoch * self.epoch_len + self.index

    def seek(self, position: int) -> None:
        """Jump to an absolute position (``absolute``); the order is the same as if drawn."""
        epoch, self.index = divmod(int(position), self.epoch_len)
        if epoch != self.epoch:
            self.epoch, self._order = epoch, self._epoch_order(epoch)

    @property
    def epoch_progress(self) -> float:
        """Position in epochs (epoch + fraction of the current one)."""
        return self.epoch + self.index / len(self._order)

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "perm_seed": self.seed, "rows": self.n,
                "extra_rows": self.extra_n, "extra_per_epoch": self.extra_per_epoch}


class LengthGroupedBatches:
    """Batches of similar length, drawn from a ``SampleStream`` (Hugging Face's ``group_by_length``).

    Takes the next ``group`` batches' worth of rows from the stream, sorts them by length, cuts them
    into batches and hands those out in an order shuffled by ``(seed, draw)``: the rows and their
    epochs are the stream's, only their grouping into batches changes, so a batch pads to a length
    close to its rows' own (random batches of 32 on the demo's en-us are 43 % padding). Used by base
    pre-training, which never resumes mid-way; adapter jobs keep the stream's exact order.
    """

    def __init__(self, stream: SampleStream, lengths: np.ndarray, batch_size: int, group: int = 4):
        self.stream, self.lengths, self.batch_size, self.group = stream, np.asarray(lengths), batch_size, group
        self._pending: list[list[int]] = []
        self._draws = 0

    def next_batch(self) -> list[int]:
        if not self._pending:
            rows = np.array(self.stream.next_batch(self.batch_size * self.group))
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            batches = [rows[i:i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]
            order = np.random.default_rng([self.stream.seed, self._draws, 2]).permutation(len(batches))
            self._pending = [batches[i] for i in order]
            self._draws += 1
        return self._pending.pop()


def segment_cursor(segments: list[tuple[int, int]], done: int) -> tuple[int, int]:
    """Where sample ``done`` of a slice lies: (absolute stream position, samples left in its
    segment); (-1, 0) once every segment is drawn. A slice of a distributed round trains the
    samples ``start .. stop-1`` of each of its segments, in order."""
    for start, stop in segments:
        if done < stop - start:
            return start + done, stop - start - done
        done -= stop - start
    return -1, 0


def check_segments(segments: list[tuple[int, int]]) -> int:
    """The number of samples in ``segments``; ValueError naming a segment that is not a non-empty
    range of non-negative positions."""
    total = 0
    for k, seg in enumerate(segments):
        if len(seg) != 2 or not all(isinstance(x, int) for x in seg) or not 0 <= seg[0] < seg[1]:
            raise ValueError(f"segment {k} {seg!r}: expected [start, stop) with 0 <= start < stop")
        total += seg[1] - seg[0]
    return total


def make_batch(fs: FeatureSet, labels: list[list[int]], idx: list[int], device: str) -> tuple[dict, int]:
    """Rows ``idx`` of a feature set as a padded CTC batch on ``device``, and its number of frames."""
    b = collate([fs.item(i) for i in idx], [labels[i] for i in idx])
    frames = int(b["attention_mask"].sum())
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}, frames


def rehearsal_rows_per_epoch(rows: int, fraction: float) -> int:
    """Rehearsal rows to add to an epoch of ``rows`` so they are ``fraction`` of it (capped at 0.9)."""
    f = min(max(fraction, 0.0), 0.9)
    return round(rows * f / (1 - f))

