"""Dataset versions: validate incoming batches, write content-addressed Parquet versions.

Layout under ``<datasets_root>/<dialect>/``::

    batches/<batch_id>-<key>/      one validated batch (reused while its inputs are unchanged)
        part-00000.parquet ...     accepted rows, 16 kHz mono PCM16 audio + transcript + speaker ...
        summary.json               counts, speakers, shards and this batch's rejected rows
    versions/<version>/            one dataset version
        manifest.json              batches + shards, speaker→split map, cross-batch exclusions
        quarantine.parquet         every rejected row: batch, line, field, reason, detail

A version is the hash of its manifest. Validating one batch is ``core/data/batches.py``; an
unchanged batch is never read again (its key hashes its inputs), so adding 1 % new data
costs about 1 % of a full build. Nothing under ``incoming/`` is ever written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mloc_dagster.core.data.audio import from_pcm16
from mloc_dagster.core.data.batches import (
    INGEST_VERSION,
    QUARANTINE_SCHEMA,
    BatchRef,
    BatchSummary,
    DatasetError,
    IngestSettings,
    Rejection,
    ingest_batch,
)
from mloc_dagster.core.data.splits import SPLITS, SplitPolicy, assign_splits, split_report

# --------------------------------------------------------------------------- a version


@dataclass
class VersionResult:
    version: str
    path: Path
    manifest: dict
    rejected: list[Rejection]
    reused_batches: int
    built_batches: int
    warnings: list[str]

    @property
    def rows(self) -> int:
        return self.manifest["rows"]


def build_version(dialect: str, batches: list[BatchRef], dialect_root: Path,
                  settings: IngestSettings = IngestSettings(),
                  log: Callable[[str], None] = lambda _msg: None,
                  split_policy: SplitPolicy | None = None) -> VersionResult:
    """Build (or find) the version for these batches. Raises ``DatasetError`` when no row is usable.

    Splits follow ``split_policy`` (``core/data/splits.py``: speaker-disjoint, ≥ 5 test and dev speakers
    when the dialect has enough); the manifest's ``split`` entry records the policy, the speakers
    per split and ``sufficient_test_speakers``, and a shortfall is also returned as a warning."""
    split_policy = split_policy or SplitPolicy()
    summaries: list[tuple[str, BatchSummary]] = []
    reused = built = 0
    warnings: list[str] = []
    for batch in batches:
        key = batch.cache_key(settings)
        rel = f"batches/{batch.batch_id}-{key}"
        cache = dialect_root / rel
        if (cache / "summary.json").is_file():
            summary = BatchSummary.from_json(json.loads((cache / "summary.json").read_text()))
            reused += 1
        else:
            log(f"validating batch {batch.batch_id}")
            summary = ingest_batch(batch, settings, cache)
            built += 1
        if summary.rows == 0:
            reasons = Counter(r.reason for r in summary.rejected)
            warnings.append(f"batch {batch.batch_id} has no valid rows ({dict(reasons)}); it adds nothing")
        summaries.append((rel, summary))

    rejected = [r for _, s in summaries for r in s.rejected]
    excluded, dup_rejections = _cross_batch_duplicates(dialect_root, summaries)
    rejected += dup_rejections

    speaker_stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for _, s in summaries:
        for spk, (n, sec) in s.speakers.items():
            speaker_stats[spk][0] += n
            speaker_stats[spk][1] += sec
    rows = sum(s.rows for _, s in summaries) - len(excluded)
    if rows <= 0:
        detail = "; ".join(str(r) for r in rejected[:5])
        raise DatasetError(f"no valid rows for dialect {dialect!r} in {len(batches)} batch(es); "
                           f"{len(rejected)} rejected, e.g. {detail}")

    splits = assign_splits(dialect, speaker_stats, split_policy)
    split_info = split_report(splits, split_policy)
    if not split_info["sufficient_test_speakers"]:
        warnings.append(f"{dialect}: {split_info['test_speakers']} test speaker(s) of "
                        f"{len(splits)}, fewer than the {split_policy.min_test_speakers} the gate needs "
                        "(it will fail with 'insufficient evidence'); add speakers")
    per_split = {s: {"rows": 0, "seconds": 0.0, "speakers": 0} for s in SPLITS}
    for spk, (n, sec) in speaker_stats.items():
        per_split[splits[spk]]["rows"] += n
        per_split[splits[spk]]["seconds"] += sec
        per_split[splits[spk]]["speakers"] += 1
    manifest = {
        "format": 1, "dialect": dialect, "ingest_version": INGEST_VERSION,
        "settings": settings.fingerprint(),
        "batches": [{"batch_id": s.batch_id, "content": s.content, "key": s.key, "dir": rel, "rows": s.rows,
                     "shards": [f"{rel}/{n}" for n in s.shards]} for rel, s in summaries],
        "splits": dict(sorted(splits.items())),
        "excluded": sorted(excluded),
        "rows": rows,
        "seconds": round(sum(s.seconds for _, s in summaries), 3),
        "per_split": per_split,
        "split": split_info,
        "quarantined": len(rejected),
    }
    # Exclusions shrink per-split counts; recount them exactly from the shards' cheap columns.
    if excluded:
        _recount_after_exclusions(dialect_root, manifest)
    version = _content_hash(manifest)
    path = dialect_root / "versions" / version
    if not (path / "manifest.json").is_file():
        _write_version(path, manifest | {"version": version}, rejected)
    (dialect_root / "LATEST").write_text(version + "\n")
    return VersionResult(version, path, manifest | {"version": version}, rejected, reused, built, warnings)


def _content_hash(manifest: dict) -> str:
    """The version: a hash of what the data *is* (batch contents, splits, exclusions, settings),
    not of where the cache put it, so re-creating identical files gives the same version."""
    canonical = manifest | {"batches": [{k: v for k, v in b.items() if k not in ("key", "dir", "shards")}
                                        for b in manifest["batches"]]}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def _cross_batch_duplicates(dialect_root: Path, summaries) -> tuple[set[str], list[Rejection]]:
    """The same audio in two batches is kept once (earliest batch wins). Reads one column."""
    first: dict[str, str] = {}
    excluded: set[str] = set()
    rejections = []
    for rel, s in summaries:
        for shard in s.shards:
            t = pq.read_table(dialect_root / rel / shard, columns=["utt_id", "sha256", "line"])
            for utt, sha, line in zip(*(t.column(c).to_pylist() for c in ("utt_id", "sha256", "line"))):
                if sha in first:
                    excluded.add(utt)
                    rejections.append(Rejection(s.batch_id, line, "audio", "duplicate_audio",
                                                f"same audio as {first[sha]}"))
                else:
                    first[sha] = utt
    return excluded, rejections


def _recount_after_exclusions(dialect_root: Path, manifest: dict) -> None:
    excluded = set(manifest["excluded"])
    per_split = {s: {"rows": 0, "seconds": 0.0, "speakers": set()} for s in SPLITS}
    total = 0.0
    for b in manifest["batches"]:
        for shard in b["shards"]:
            t = pq.read_table(dialect_root / shard, columns=["utt_id", "speaker", "duration"])
            for utt, spk, dur in zip(*(t.column(c).to_pylist() for c in ("utt_id", "speaker", "duration"))):
                if utt in excluded:
                    continue
                split = manifest["splits"][spk]
                per_split[split]["rows"] += 1
                per_split[split]["seconds"] += dur
                per_split[split]["speakers"].add(spk)
                total += dur
    manifest["per_split"] = {s: v | {"speakers": len(v["speakers"])} for s, v in per_split.items()}
    manifest["seconds"] = round(total, 3)


def _write_version(path: Path, manifest: dict, rejected: list[Rejection]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    table = pa.Table.from_pylist([asdict(r) for r in rejected], schema=QUARANTINE_SCHEMA)
    pq.write_table(table, tmp / "quarantine.parquet")
    if path.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(path)


# --------------------------------------------------------------------------- reading


@dataclass
class Utterance:
    utt_id: str
    audio: np.ndarray  # float32, 16 kHz mono
    text: str
    speaker: str
    contributor: str
    duration: float
    sha256: str


class DatasetVersion:
    """Read side of a version directory (``.../<dialect>/versions/<version>``)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.version: str = self.manifest["version"]
        self.dialect: str = self.manifest["dialect"]
        self.root = self.path.parent.parent
        self._excluded = set(self.manifest["excluded"])

    @property
    def splits(self) -> dict[str, str]:
        return self.manifest["splits"]

    @property
    def test_speakers(self) -> int:
        """Speakers with rows in the test split (what the gate's speaker bootstrap resamples)."""
        return int(self.manifest["per_split"]["test"]["speakers"])

    @property
    def min_test_speakers(self) -> int:
        """The split policy's minimum (versions built before the policy existed: the default)."""
        return int(self.manifest.get("split", {}).get("min_test_speakers", SplitPolicy().min_test_speakers))

    def num_rows(self, split: str | None = None) -> int:
        return self.manifest["rows"] if split is None else self.manifest["per_split"][split]["rows"]

    def quarantine(self) -> pa.Table:
        return pq.read_table(self.path / "quarantine.parquet")

    def iter_utterances(self, split: str | None = None) -> Iterator[Utterance]:
        wanted = {s for s, sp in self.splits.items() if split is None or sp == split}
        for b in self.manifest["batches"]:
            for shard in b["shards"]:
                pf = pq.ParquetFile(self.root / shard)
                for rg in range(pf.num_row_groups):
                    for r in pf.read_row_group(rg).to_pylist():
                        if r["speaker"] in wanted and r["utt_id"] not in self._excluded:
                            yield Utterance(r["utt_id"], from_pcm16(r["audio"]), r["text"], r["speaker"],
                                            r["contributor"], r["duration"], r["sha256"])

    def preview(self, n: int = 5) -> list[dict]:
        out = []
        for u in self.iter_utterances():
            out.append({"utt_id": u.utt_id, "speaker": u.speaker, "split": self.splits[u.speaker],
                        "duration_s": round(u.duration, 2), "text": u.text})
            if len(out) >= n:
                break
        return out
