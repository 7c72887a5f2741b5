"""Ingest on real espeak audio: the happy path, every bad-input class, incremental reuse."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from mloc_dagster.core.data.batches import DatasetError, IngestSettings, find_batches
from mloc_dagster.core.data.datasets import DatasetVersion, build_version
from tests.conftest import copy_batch, write_manifest

DIALECT = "en-gb-scotland"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def build(home: Path, settings: IngestSettings = IngestSettings()):
    return build_version(DIALECT, find_batches(home / "incoming", DIALECT), home / "datasets" / DIALECT, settings)


def test_happy_path_real_espeak(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    before = tree_digest(tmp_path / "incoming")
    result = build(tmp_path)

    assert result.rows == 36 and result.rejected == [] and result.built_batches == 1
    version = DatasetVersion(result.path)
    utts = list(version.iter_utterances())
    assert len(utts) == 36
    assert all(u.audio.dtype == np.float32 and 0.3 <= len(u.audio) / 16000 <= 30 for u in utts)
    # speaker-disjoint splits, all three non-empty
    by_split = {s: {u.speaker for u in version.iter_utterances(s)} for s in ("train", "dev", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["dev"]) and not (by_split["train"] & by_split["test"])
    assert sum(version.num_rows(s) for s in ("train", "dev", "test")) == 36
    # the manifest hash is the version, and nothing under incoming/ changed
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["version"] == result.version
    assert tree_digest(tmp_path / "incoming") == before


def test_idempotent_and_incremental(tmp_path, espeak_batch):
    incoming = tmp_path / "incoming"
    copy_batch(espeak_batch, incoming, DIALECT, "b0001")
    first = build(tmp_path)
    again = build(tmp_path)
    assert again.version == first.version and again.reused_batches == 1 and again.built_batches == 0

    # a new batch: the old batch's shards are reused untouched, only the new one is validated
    shards_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "datasets").rglob("*.parquet")}
    new = incoming / DIALECT / "b0002"
    shutil.copytree(espeak_batch / "audio", new / "audio")
    rows = [json.loads(line) for line in (espeak_batch / "manifest.jsonl").read_text().splitlines()][:4]
    for r in rows:  # re-record with different gain so the audio is new, not a duplicate
        data, sr = sf.read(new / r["audio"])
        sf.write(new / r["audio"], data * 0.5, sr)
    write_manifest(new, rows)
    second = build(tmp_path)
    assert second.version != first.version
    assert second.reused_batches == 1 and second.built_batches == 1 and second.rows == 40
    for p, mtime in shards_before.items():
        assert p.stat().st_mtime_ns == mtime


def test_shards_are_bounded(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    result = build(tmp_path, IngestSettings(shard_max_bytes=200_000, row_group_rows=4))
    shards = result.manifest["batches"][0]["shards"]
    assert len(shards) > 3
    root = tmp_path / "datasets" / DIALECT
    assert sum(pq.ParquetFile(root / s).metadata.num_rows for s in shards) == 36


@pytest.fixture()
def bad_batch(tmp_path, espeak_batch):
    """A batch with one good row followed by one row per bad-input class."""
    batch = copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    good = [json.loads(line) for line in (batch / "manifest.jsonl").read_text().splitlines()]
    (batch / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 10)
    sf.write(batch / "long.wav", np.zeros(16000 * 600, dtype=np.float32), 16000)
    sf.write(batch / "stereo44k.flac", np.random.default_rng(0).uniform(-.1, .1, (44100, 2)), 44100)
    (tmp_path / "outside.wav").write_bytes((batch / good[0]["audio"]).read_bytes())
    row = lambda **kw: {"speaker": "spk-x", "contributor": "c1", **kw}  # noqa: E731
    rows = [
        good[0],                                                        # line 1: ok
        b'{"audio": "audio/000001.wav", "text": ',                      # 2: malformed JSON
        row(audio="audio/missing.wav", text="hello there"),             # 3: missing file
        row(audio="corrupt.wav", text="hello there"),                   # 4: corrupt audio
        row(audio="../../outside.wav", text="hello there"),             # 5: path escape
        row(audio="/etc/passwd", text="hello there"),                   # 6: absolute path
        b'{"audio": "audio/000002.wav", "text": "caf\xe9 au lait", "speaker": "s", "contributor": "c"}',  # 7
        row(audio="long.wav", text="a very long recording"),            # 8: 10 minutes
        row(audio="audio/000003.wav", text="  ...  "),                  # 9: empty transcript
        row(audio="audio/000004.wav", text="naïve 42 ∑"),               # 10: charset
        row(audio=good[0]["audio"], text="the same audio again"),       # 11: duplicate
        row(audio="stereo44k.flac", text="stereo flac at forty four k"),  # 12: ok, resampled
        {"audio": "audio/000005.wav", "text": "no speaker"},            # 13: missing field
    ]
    write_manifest(batch, rows)
    return batch


EXPECTED = {
    2: ("manifest", "malformed_line"), 3: ("audio", "missing_file"), 4: ("audio", "corrupt_audio"),
    5: ("audio", "path_outside_batch"), 6: ("audio", "path_outside_batch"), 7: ("text", "not_utf8"),
    8: ("audio", "too_long"), 9: ("text", "empty_transcript"), 10: ("text", "charset"),
    11: ("audio", "duplicate_audio"), 13: ("speaker", "missing_field"),
}


def test_every_bad_row_is_quarantined_with_reason(tmp_path, bad_batch):
    before = tree_digest(tmp_path / "incoming")
    result = build(tmp_path)
    got = {r.line: (r.field, r.reason) for r in result.rejected}
    assert got == EXPECTED
    assert all(r.batch == "b0001" and r.detail for r in result.rejected)
    assert result.rows == 2  # line 1 and the resampled stereo flac
    flac = next(u for u in DatasetVersion(result.path).iter_utterances() if u.utt_id == "b0001/12")
    assert abs(len(flac.audio) - 16000) <= 1
    table = DatasetVersion(result.path).quarantine().to_pylist()
    assert {(r["line"], r["field"], r["reason"]) for r in table} == {(k, *v) for k, v in EXPECTED.items()}
    assert tree_digest(tmp_path / "incoming") == before
    assert build(tmp_path).version == result.version  # re-running is idempotent


def test_file_size_limit(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    with pytest.raises(DatasetError, match="file_too_large"):
        build(tmp_path, IngestSettings(max_file_bytes=1000))
    sizes = sorted(p.stat().st_size for p in (espeak_batch / "audio").iterdir())
    limit = sizes[len(sizes) // 2]
    result = build(tmp_path, IngestSettings(max_file_bytes=limit))
    too_large = [r for r in result.rejected if r.reason == "file_too_large"]
    assert too_large and result.rows + len(too_large) == 36
    assert all(r.field == "audio" and f"> limit {limit}" in r.detail for r in too_large)


def test_all_invalid_batch_warns_and_makes_no_empty_version(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    bad = tmp_path / "incoming" / DIALECT / "b0002"
    bad.mkdir()
    write_manifest(bad, [{"audio": "nope.wav", "text": "x", "speaker": "s", "contributor": "c"}])
    empty = tmp_path / "incoming" / DIALECT / "b0003"
    empty.mkdir()
    (empty / "manifest.jsonl").write_bytes(b"")
    result = build(tmp_path)
    assert result.rows == 36
    assert any("b0002" in w for w in result.warnings) and any("b0003" in w for w in result.warnings)
    assert {(r.batch, r.reason) for r in result.rejected} == {("b0002", "missing_file"), ("b0003", "empty_manifest")}

    # only invalid batches → a clear error and no version directory at all
    only_bad = tmp_path / "only"
    shutil.copytree(bad, only_bad / "incoming" / DIALECT / "b0002")
    with pytest.raises(DatasetError, match="no valid rows.*b0002 line 1 field 'audio': missing_file"):
        build(only_bad)
    assert not (only_bad / "datasets" / DIALECT / "versions").exists()


def test_csv_manifest(tmp_path, espeak_batch):
    batch = copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    rows = [json.loads(line) for line in (batch / "manifest.jsonl").read_text().splitlines()][:3]
    (batch / "manifest.jsonl").unlink()
    csv = "audio,text,speaker,contributor\n" + "".join(
        f'{r["audio"]},"{r["text"]}",{r["speaker"]},{r["contributor"]}\n' for r in rows) + "only,two\n"
    (batch / "manifest.csv").write_text(csv)
    result = build(tmp_path)
    assert result.rows == 3
    assert [(r.line, r.reason) for r in result.rejected] == [(5, "malformed_line")]


def test_version_depends_on_content_not_file_times(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "a" / "incoming", DIALECT, "b0001")
    first = build(tmp_path / "a")
    batch = copy_batch(espeak_batch, tmp_path / "b" / "incoming", DIALECT, "b0001")
    for p in batch.rglob("*.wav"):
        os.utime(p, ns=(1, 1))  # same bytes, other mtimes: a different cache key, the same version
    second = build(tmp_path / "b")
    assert second.built_batches == 1 and second.version == first.version
    data, sr = sf.read(batch / "audio" / "000000.wav")
    sf.write(batch / "audio" / "000000.wav", data * 0.9, sr)  # changed content: a new version
    assert build(tmp_path / "b").version != first.version


# --------------------------------------------------------------------------- split policy


def test_splits_guarantee_minimum_evaluation_speakers_and_rows():
    from collections import Counter

    from mloc_dagster.core.data.splits import SplitPolicy, assign_splits, split_report

    # the demo corpus shape: 40 speakers × 30 utterances
    splits = assign_splits("en-gb-scotland", {f"spk{i:02d}": [30, 60.0] for i in range(40)})
    per = Counter(splits.values())
    assert per["test"] >= 5 and per["dev"] >= 5 and per["train"] >= 20
    assert per["test"] * 30 >= 150 and per["dev"] * 30 >= 150
    # stable: the same speakers give the same splits, whatever their order
    assert assign_splits("en-gb-scotland", {f"spk{i:02d}": [30, 60.0] for i in reversed(range(40))}) == splits
    for dialect in ("a", "b", "c", "d", "e", "f"):
        for n in range(3, 30):
            per = Counter(assign_splits(dialect, [f"s{i}" for i in range(n)]).values())
            assert per["train"] >= 1 and per["dev"] >= 1 and per["test"] >= 1
            if n >= 12:  # 5 test speakers as soon as half the speakers allow it
                assert per["test"] >= 5
    # configurable minimum, recorded with the verdict the gate needs
    few = assign_splits("x", [f"s{i}" for i in range(12)], SplitPolicy(min_test_speakers=3, min_dev_speakers=1))
    assert Counter(few.values())["test"] >= 3
    report = split_report(assign_splits("x", [f"s{i}" for i in range(6)]))
    assert report["test_speakers"] < 5 and report["sufficient_test_speakers"] is False
    assert report["min_test_speakers"] == 5


def test_manifest_records_test_speakers_and_warns_when_too_few(tmp_path, espeak_batch):
    copy_batch(espeak_batch, tmp_path / "incoming", DIALECT, "b0001")
    result = build(tmp_path)  # 12 speakers: 5 test speakers, the minimum
    version = DatasetVersion(result.path)
    assert version.test_speakers == result.manifest["split"]["test_speakers"] == 5
    assert result.manifest["split"]["sufficient_test_speakers"] and not result.warnings
    assert version.min_test_speakers == 5

    from mloc_dagster.core.data.splits import SplitPolicy
    strict = build_version(DIALECT, find_batches(tmp_path / "incoming", DIALECT), tmp_path / "strict" / DIALECT,
                           split_policy=SplitPolicy(min_test_speakers=8))
    assert strict.manifest["split"]["test_speakers"] < 8
    assert not strict.manifest["split"]["sufficient_test_speakers"]
    assert any("fewer than the 8 the gate needs" in w for w in strict.warnings)
