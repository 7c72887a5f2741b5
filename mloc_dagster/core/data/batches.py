"""Incoming batches: find them, validate one row by row, write its accepted rows as Parquet shards.

A batch is ``incoming/<dialect>/<batch_id>/`` with a ``manifest.jsonl`` or ``manifest.csv``. Every
row ends up accepted (a row of a ``part-*.parquet`` shard: 16 kHz mono PCM16 audio, transcript,
speaker...) or rejected with its batch, line, field and reason. ``ingest_batch`` writes the
validated batch to ``batches/<batch_id>-<key>/`` of the dialect's dataset root; its key hashes the
manifest bytes, the size and mtime of every file it names and the validation settings, so
``core/data/datasets.py`` reuses an unchanged batch without reading it again. Shards are written
streaming, in row groups, so memory does not grow with the data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mloc_dagster.core.data.audio import AudioError, decode_to_16k_mono, probe_duration, to_pcm16
from mloc_dagster.core.data.text import ENGLISH_CHARSET, characters_outside, normalize_transcript

INGEST_VERSION = "1"  # bump when validation changes meaning: it invalidates every batch cache
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
REQUIRED_FIELDS = ("audio", "text", "speaker", "contributor")

SHARD_SCHEMA = pa.schema([
    ("utt_id", pa.string()), ("batch", pa.string()), ("line", pa.int32()),
    ("audio", pa.binary()), ("num_samples", pa.int32()), ("duration", pa.float32()),
    ("text", pa.string()), ("raw_text", pa.string()), ("speaker", pa.string()),
    ("contributor", pa.string()), ("sha256", pa.string()), ("source", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("batch", pa.string()), ("line", pa.int32()), ("field", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])


class DatasetError(Exception):
    """Raised when no usable version can be produced; the message says what to fix."""


@dataclass(frozen=True)
class IngestSettings:
    min_duration_s: float = 0.3
    max_duration_s: float = 30.0
    max_file_bytes: int = 32 * 2**20
    shard_max_bytes: int = 64 * 2**20
    row_group_rows: int = 256
    charset: frozenset[str] = ENGLISH_CHARSET

    def fingerprint(self) -> str:
        d = asdict(self) | {"charset": "".join(sorted(self.charset)), "ingest": INGEST_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Rejection:
    batch: str
    line: int
    field: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.batch} line {self.line} field '{self.field}': {self.reason} ({self.detail})"


@dataclass(frozen=True)
class BatchRef:
    dialect: str
    batch_id: str
    path: Path
    manifest: Path

    def cache_key(self, settings: IngestSettings) -> str:
        """Cheap content key: manifest bytes + stat of every file under the batch + settings."""
        h = hashlib.sha256(settings.fingerprint().encode())
        h.update(self.manifest.read_bytes())
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p != self.manifest:
                st = p.stat()
                h.update(f"{p.relative_to(self.path)}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def find_batches(incoming_root: Path, dialect: str) -> list[BatchRef]:
    """Complete batches (their manifest exists) of one dialect, in batch-id order."""
    root = incoming_root / dialect
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        manifest = next((d / n for n in MANIFEST_NAMES if (d / n).is_file()), None)
        if manifest is not None:
            out.append(BatchRef(dialect, d.name, d, manifest))
    return out


# --------------------------------------------------------------------------- one batch


@dataclass
class BatchSummary:
    batch_id: str
    key: str
    rows: int = 0
    seconds: float = 0.0
    speakers: dict[str, list[float]] = field(default_factory=dict)  # speaker -> [rows, seconds]
    shards: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    content: str = ""  # sha256 over accepted rows (audio hash, text, speaker, ...) and rejections

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BatchSummary:
        return cls(**(d | {"rejected": [Rejection(**r) for r in d["rejected"]]}))


class _ShardWriter:
    """Writes rows in row groups and rolls to a new file past ``max_bytes``: bounded memory."""

    def __init__(self, out_dir: Path, max_bytes: int, row_group_rows: int):
        self.out_dir, self.max_bytes, self.row_group_rows = out_dir, max_bytes, row_group_rows
        self.buffer: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.file_bytes = 0
        self.shards: list[str] = []

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            name = f"part-{len(self.shards):05d}.parquet"
            self.writer = pq.ParquetWriter(self.out_dir / name, SHARD_SCHEMA, compression="zstd")
            self.shards.append(name)
            self.file_bytes = 0
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=SHARD_SCHEMA))
        self.file_bytes += sum(len(r["audio"]) for r in self.buffer)
        self.buffer = []
        if self.file_bytes >= self.max_bytes:
            self.writer.close()
            self.writer = None

    def close(self) -> list[str]:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        return self.shards


def _read_manifest_rows(batch: BatchRef) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (line number, row or None, parse error or None). Text is decoded with
    surrogateescape so one bad byte spoils one field, not the whole manifest."""
    raw = batch.manifest.read_bytes()
    if batch.manifest.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8", errors="surrogateescape"), newline=""))
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                yield reader.line_num, None, "wrong number of columns"
            else:
                yield reader.line_num, row, None
        return
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as exc:
            yield n, None, f"not valid JSON: {exc.msg} at column {exc.colno}"
            continue
        if not isinstance(row, dict):
            yield n, None, f"expected a JSON object, got {type(row).__name__}"
            continue
        yield n, row, None


def _has_bad_bytes(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


def _validate_row(batch: BatchRef, line: int, row: dict, settings: IngestSettings,
                  seen: dict[str, int]) -> tuple[dict | None, Rejection | None]:
    def reject(field_name: str, reason: str, detail: str):
        return None, Rejection(batch.batch_id, line, field_name, reason, detail)

    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if not isinstance(value, str) or (name != "text" and not value.strip()):
            return reject(name, "missing_field", f"expected a non-empty string, got {value!r}")
        if _has_bad_bytes(value):
            return reject(name, "not_utf8", "value is not valid UTF-8")

    rel = row["audio"]
    if os.path.isabs(rel):
        return reject("audio", "path_outside_batch", f"absolute path {rel!r} is not allowed")
    batch_root = batch.path.resolve()
    path = (batch.path / rel).resolve()
    if not path.is_relative_to(batch_root):
        return reject("audio", "path_outside_batch", f"{rel!r} resolves outside the batch directory")
    if not path.is_file():
        return reject("audio", "missing_file", f"{rel!r} does not exist")
    size = path.stat().st_size
    if size > settings.max_file_bytes:
        return reject("audio", "file_too_large", f"{size} bytes > limit {settings.max_file_bytes}")

    text = normalize_transcript(row["text"])
    if not text:
        return reject("text", "empty_transcript", f"{row['text']!r} is empty after normalization")
    bad = characters_outside(text, settings.charset)
    if bad:
        return reject("text", "charset", f"characters outside the dialect charset: {''.join(bad)!r}")

    data = path.read_bytes()
    try:
        duration = probe_duration(data)
        if not settings.min_duration_s <= duration <= settings.max_duration_s:
            reason = "too_short" if duration < settings.min_duration_s else "too_long"
            return reject("audio", reason, f"{duration:.2f} s outside "
                          f"[{settings.min_duration_s}, {settings.max_duration_s}] s")
        audio = decode_to_16k_mono(data)
    except AudioError as exc:
        return reject("audio", "corrupt_audio", str(exc))

    sha = hashlib.sha256(data).hexdigest()
    if sha in seen:
        return reject("audio", "duplicate_audio", f"same audio as line {seen[sha]} of this batch")
    seen[sha] = line
    pcm = to_pcm16(audio)
    return {
        "utt_id": f"{batch.batch_id}/{line}", "batch": batch.batch_id, "line": line, "audio": pcm,
        "num_samples": len(audio), "duration": len(audio) / 16_000, "text": text,
        "raw_text": row["text"], "speaker": row["speaker"].strip(), "contributor": row["contributor"].strip(),
        "sha256": sha, "source": rel,
    }, None


def ingest_batch(batch: BatchRef, settings: IngestSettings, out_dir: Path) -> BatchSummary:
    """Validate one batch into ``out_dir`` (written in a temp dir, renamed when complete)."""
    key = batch.cache_key(settings)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    summary = BatchSummary(batch.batch_id, key)
    writer = _ShardWriter(tmp, settings.shard_max_bytes, settings.row_group_rows)
    seen: dict[str, int] = {}
    content = hashlib.sha256()
    any_rows = False
    try:
        for line, row, error in _read_manifest_rows(batch):
            any_rows = True
            if error is not None:
                summary.rejected.append(Rejection(batch.batch_id, line, "manifest", "malformed_line", error))
                continue
            accepted, rejection = _validate_row(batch, line, row, settings, seen)
            if rejection is not None:
                summary.rejected.append(rejection)
                continue
            writer.add(accepted)
            content.update(json.dumps([accepted[k] for k in ("utt_id", "sha256", "text", "speaker", "contributor")]
                                      ).encode())
            summary.rows += 1
            summary.seconds += accepted["duration"]
            stats = summary.speakers.setdefault(accepted["speaker"], [0, 0.0])
            stats[0] += 1
            stats[1] += accepted["duration"]
        if not any_rows:
            summary.rejected.append(Rejection(batch.batch_id, 0, "manifest", "empty_manifest",
                                              f"{batch.manifest.name} has no rows"))
        summary.shards = writer.close()
        for r in summary.rejected:
            content.update(json.dumps(asdict(r)).encode())
        summary.content = content.hexdigest()
        (tmp / "summary.json").write_text(json.dumps(summary.to_json(), indent=1))
        if out_dir.exists():  # a concurrent build finished the same key first; identical content
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
