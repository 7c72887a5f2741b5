"""incoming_batches_sensor: new complete batches → new dialect partitions + dataset_version runs."""

import hashlib
import json

import dagster as dg

from mloc_dagster.assets.datasets.versions import ingest_job
from mloc_dagster.core.data.batches import find_batches
from mloc_dagster.partitions import dialect_partitions, is_valid_dialect
from mloc_dagster.paths import mloc_home


def scan_incoming(incoming) -> dict[str, list[str]]:
    """dialect → complete batch ids. A stat per batch directory; no file is read."""
    found: dict[str, list[str]] = {}
    if incoming.is_dir():
        for d in sorted(p for p in incoming.iterdir() if p.is_dir()):
            found[d.name] = [b.batch_id for b in find_batches(incoming, d.name)]
    return found


@dg.sensor(job=ingest_job, minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds new dialects and requests a dataset_version build for each dialect "
                       "with new complete batches (a batch is complete when its manifest exists).")
def incoming_batches_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    seen: dict[str, list[str]] = json.loads(context.cursor) if context.cursor else {}
    current = scan_incoming(mloc_home() / "incoming")
    known = set(context.instance.get_dynamic_partitions(dialect_partitions.name))

    new_dialects, requests = [], []
    for dialect, batch_ids in current.items():
        if not is_valid_dialect(dialect):
            context.log.warning(f"ignoring incoming/{dialect}: dialect keys are lowercase [a-z0-9-]")
            continue
        if not batch_ids or set(batch_ids) <= set(seen.get(dialect, [])):
            continue
        if dialect not in known:
            new_dialects.append(dialect)
        batch_set = hashlib.sha256("\n".join(batch_ids).encode()).hexdigest()[:12]
        requests.append(dg.RunRequest(partition_key=dialect, run_key=f"{dialect}:{batch_set}",
                                      tags={"mloc/batches": str(len(batch_ids))}))
        seen[dialect] = batch_ids

    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dialect_partitions.build_add_request(new_dialects)] if new_dialects else [],
        cursor=json.dumps(seen, sort_keys=True),
    )


defs = dg.Definitions(sensors=[incoming_batches_sensor])
