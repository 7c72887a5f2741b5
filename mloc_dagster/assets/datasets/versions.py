"""dataset_version: incoming batches of one dialect → a validated, content-addressed version."""

import dagster as dg

from mloc_dagster.core.data.batches import INGEST_VERSION, DatasetError, IngestSettings, find_batches
from mloc_dagster.core.data.datasets import DatasetVersion, build_version
from mloc_dagster.core.data.text import charset_for
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore


class DatasetConfig(dg.Config):
    min_duration_s: float = 0.3
    max_duration_s: float = 30.0
    max_file_mb: float = 32.0
    shard_max_mb: float = 64.0
    charset: str = ""  # empty: the dialect's default character set


@dg.asset(
    partitions_def=dialect_partitions,
    group_name="datasets",
    kinds={"parquet"},
    code_version=INGEST_VERSION,
    description="Validated, content-addressed dataset version of one dialect: Parquet shards, "
                "speaker-disjoint splits and a quarantine table of every rejected row.",
)
def dataset_version(context: dg.AssetExecutionContext, config: DatasetConfig,
                    artifacts: ArtifactStore) -> dg.MaterializeResult:
    dialect = context.partition_key
    paths = artifacts.paths
    batches = find_batches(paths.incoming, dialect)
    if not batches:
        raise dg.Failure(f"no complete batch under {paths.incoming / dialect}: a batch is a directory "
                         "with audio files and a manifest.jsonl or manifest.csv")
    settings = IngestSettings(
        min_duration_s=config.min_duration_s, max_duration_s=config.max_duration_s,
        max_file_bytes=int(config.max_file_mb * 2**20), shard_max_bytes=int(config.shard_max_mb * 2**20),
        charset=charset_for(dialect, config.charset or None),
    )
    try:
        result = build_version(dialect, batches, paths.datasets / dialect, settings, log=context.log.info)
    except DatasetError as exc:
        raise dg.Failure(description=str(exc)) from exc
    for warning in result.warnings:
        context.log.warning(warning)

    m = result.manifest
    reasons: dict[str, int] = {}
    for r in result.rejected:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    version = DatasetVersion(result.path)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.version),
        metadata={
            "version": result.version,
            "rows": m["rows"],
            "hours": round(m["seconds"] / 3600, 4),
            "speakers": len(m["splits"]),
            **{f"{split}_rows": v["rows"] for split, v in m["per_split"].items()},
            **{f"{split}_speakers": v["speakers"] for split, v in m["per_split"].items()},
            "quarantined": len(result.rejected),
            "quarantined_by_reason": dg.MetadataValue.json(reasons),
            "quarantine_sample": dg.MetadataValue.md(_quarantine_md(result.rejected[:20])),
            "batches": len(batches),
            "batches_reused": result.reused_batches,
            "batches_built": result.built_batches,
            "preview": dg.MetadataValue.md(_preview_md(version.preview(5))),
            "path": dg.MetadataValue.path(str(result.path)),
            "quarantine_path": dg.MetadataValue.path(str(result.path / "quarantine.parquet")),
        },
    )


def _preview_md(rows: list[dict]) -> str:
    lines = ["| utt_id | speaker | split | duration_s | text |", "|---|---|---|---|---|"]
    lines += [f"| {r['utt_id']} | {r['speaker']} | {r['split']} | {r['duration_s']} | {r['text']} |" for r in rows]
    return "\n".join(lines)


def _quarantine_md(rejected) -> str:
    if not rejected:
        return "No rejected rows."
    lines = ["| batch | line | field | reason | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r.batch} | {r.line} | {r.field} | {r.reason} | {r.detail.replace('|', '/')} |" for r in rejected]
    return "\n".join(lines)


ingest_job = dg.define_asset_job(
    "ingest_job", selection=[dataset_version], partitions_def=dialect_partitions,
    description="Build the dataset version of one dialect from its incoming batches.",
)

defs = dg.Definitions(assets=[dataset_version], jobs=[ingest_job])
