"""Reading upstream materializations' metadata (paths, versions) from the instance."""

from __future__ import annotations

import dagster as dg


def latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict | None:
    """Metadata values of the newest materialization of ``asset`` (of ``partition``), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def metadata_of_version(instance: dg.DagsterInstance, asset: str, version: str, scan: int = 1000) -> dict | None:
    """Metadata values of the newest materialization of ``asset`` whose ``version`` is ``version``
    (the very model a run pinned, whatever was materialized since), or None."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset)), limit=scan).records
    for record in records:
        metadata = record.asset_materialization.metadata
        if "version" in metadata and metadata["version"].value == version:
            return {k: v.value for k, v in metadata.items()}
    return None


def require_metadata(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict:
    md = latest_metadata(instance, asset, partition)
    if md is None:
        where = f" partition {partition!r}" if partition else ""
        raise dg.Failure(f"{asset}{where} has never been materialized; materialize it first")
    return md
