"""Export of mloc's results for analysis elsewhere: runs, jobs, candidates, gate results, promotions
and the node registry.

One call writes one versioned directory ``<out>/mloc-export-<UTC time>/`` with a file per table
(``<table>.parquet`` or ``<table>.json``, a JSON array of objects) and ``manifest.json``: the
export's schema version, when and from which state store it was taken (its URL without the
password, ``core/redact.py``), and per table its row count and columns with their types. The
schema is ``TABLES`` below (docs/operations.md prints it); a column is added at the end of its
table and the schema version goes up when one changes meaning.
Read-only over the state store's public read methods; no Dagster import.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mloc_dagster.core.redact import redact_url
from mloc_dagster.core.state import StateStore

SCHEMA_VERSION = 1
FORMATS = ("parquet", "json")

_TS = pa.timestamp("us", tz="UTC")
TABLES: dict[str, pa.Schema] = {
    "runs": pa.schema([
        ("run_id", pa.string()), ("dialect", pa.string()), ("kind", pa.string()), ("status", pa.string()),
        ("status_reason", pa.string()), ("dataset_version", pa.string()), ("base_model_version", pa.string()),
        ("hparams_json", pa.string()), ("timebox_s", pa.int64()), ("max_jobs", pa.int64()),
        ("candidate_every", pa.int64()), ("last_finished_job", pa.int64()), ("created_at", _TS),
        ("updated_at", _TS),
    ]),
    "jobs": pa.schema([
        ("run_id", pa.string()), ("job_index", pa.int64()), ("dialect", pa.string()), ("kind", pa.string()),
        ("status", pa.string()), ("attempts", pa.int64()), ("dagster_run_id", pa.string()), ("node_id", pa.string()),
        ("worker_host", pa.string()), ("checkpoint_path", pa.string()), ("adapter_sha256", pa.string()),
        ("dev_cer", pa.float64()), ("dev_wer", pa.float64()), ("train_loss", pa.float64()),
        ("metrics_json", pa.string()), ("error", pa.string()), ("candidate_id", pa.string()), ("queued_at", _TS),
        ("started_at", _TS), ("finished_at", _TS), ("duration_s", pa.float64()),
    ]),
    "candidates": pa.schema([
        ("candidate_id", pa.string()), ("dialect", pa.string()), ("created_at", _TS), ("adapter_path", pa.string()),
        ("sha256", pa.string()), ("trusted", pa.bool_()), ("n_sources", pa.int64()), ("sources_json", pa.string()),
        ("gate_decision", pa.string()), ("gate_report_path", pa.string()), ("details_json", pa.string()),
    ]),
    "gate_results": pa.schema([
        ("candidate_id", pa.string()), ("dialect", pa.string()), ("decision", pa.string()), ("gate", pa.string()),
        ("passed", pa.bool_()), ("value", pa.float64()), ("threshold", pa.float64()), ("description", pa.string()),
        ("report_path", pa.string()),
    ]),
    "promotions": pa.schema([
        ("promotion_id", pa.int64()), ("dialect", pa.string()), ("branch", pa.string()),
        ("candidate_id", pa.string()), ("promoted_at", _TS), ("adapter_path", pa.string()), ("sha256", pa.string()),
    ]),
    "nodes": pa.schema([
        ("node_id", pa.string()), ("host", pa.string()), ("device_json", pa.string()), ("reputation", pa.float64()),
        ("throughput_json", pa.string()), ("last_seen_at", _TS), ("daily_quota", pa.int64()),
        ("jobs_today", pa.int64()), ("jobs_day", pa.string()), ("drained", pa.bool_()),
        ("drained_reason", pa.string()), ("registered_at", _TS), ("updated_at", _TS),
    ]),
}


class ExportError(Exception):
    pass


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _float(metrics: dict | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def collect(store: StateStore, dialects: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Every table as rows. ``dialects`` adds dialects that have candidates but no run here."""
    runs = store.list_runs(limit=None)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    for r in runs:
        kind = r.kind
        rows["runs"].append({
            "run_id": r.run_id, "dialect": r.dialect, "kind": kind, "status": r.status,
            "status_reason": r.status_reason, "dataset_version": r.dataset_version,
            "base_model_version": r.base_model_version, "hparams_json": _json(r.hparams), "timebox_s": r.timebox_s,
            "max_jobs": r.max_jobs, "candidate_every": r.candidate_every, "last_finished_job": r.last_finished_job,
            "created_at": _utc(r.created_at), "updated_at": _utc(r.updated_at),
        })
        for j in store.jobs_for_run(r.run_id):
            started, finished = _utc(j.started_at), _utc(j.finished_at)
            rows["jobs"].append({
                "run_id": j.run_id, "job_index": j.job_index, "dialect": r.dialect, "kind": kind, "status": j.status,
                "attempts": j.attempts, "dagster_run_id": j.dagster_run_id, "node_id": j.node_id,
                "worker_host": j.worker_host, "checkpoint_path": j.checkpoint_path,
                "adapter_sha256": j.adapter_sha256, "dev_cer": _float(j.metrics, "dev_cer"),
                "dev_wer": _float(j.metrics, "dev_wer"), "train_loss": _float(j.metrics, "train_loss"),
                "metrics_json": _json(j.metrics), "error": j.error, "candidate_id": j.candidate_id,
                "queued_at": _utc(j.queued_at), "started_at": started, "finished_at": finished,
                "duration_s": (finished - started).total_seconds() if started and finished else None,
            })
    for dialect in sorted({r.dialect for r in runs} | set(dialects)):
        for c in store.list_candidates(dialect, limit=None):
            rows["candidates"].append({
                "candidate_id": c.candidate_id, "dialect": c.dialect, "created_at": _utc(c.created_at),
                "adapter_path": c.adapter_path, "sha256": c.sha256, "trusted": c.trusted,
                "n_sources": len(c.sources), "sources_json": _json([s.to_dict() for s in c.sources]),
                "gate_decision": c.gate_decision, "gate_report_path": c.gate_report_path,
                "details_json": _json(c.details),
            })
            if c.gate_decision is not None:
                rows["gate_results"].extend(_gate_rows(c))
        for p in store.list_promotions(dialect, limit=None):
            rows["promotions"].append({
                "promotion_id": p.promotion_id, "dialect": p.dialect, "branch": p.branch,
                "candidate_id": p.candidate_id, "promoted_at": _utc(p.promoted_at), "adapter_path": p.adapter_path,
                "sha256": p.sha256,
            })
    for n in store.list_nodes():
        device = getattr(n, "device", None)
        rows["nodes"].append({
            "node_id": n.node_id, "host": n.host,
            "device_json": _json(dataclasses.asdict(device) if dataclasses.is_dataclass(device) else device),
            "reputation": n.reputation, "throughput_json": _json(n.throughput), "last_seen_at": _utc(n.last_seen_at),
            "daily_quota": n.daily_quota, "jobs_today": n.jobs_today, "jobs_day": n.jobs_day, "drained": n.drained,
            "drained_reason": n.drained_reason, "registered_at": _utc(n.registered_at),
            "updated_at": _utc(n.updated_at),
        })
    return rows


def _gate_rows(c: Any) -> list[dict[str, Any]]:
    """One row per gate from the candidate's report; one row without a gate if it is unreadable."""
    base = {"candidate_id": c.candidate_id, "dialect": c.dialect, "decision": c.gate_decision,
            "report_path": c.gate_report_path}
    try:
        report = json.loads(Path(c.gate_report_path).read_text()) if c.gate_report_path else {}
    except (OSError, ValueError):
        report = {}
    gates = report.get("gates") or []
    if not gates:
        return [{**base, "gate": None, "passed": None, "value": None, "threshold": None, "description": None}]
    def limit(g: dict) -> Any:
        return g.get("threshold", g.get("limit"))  # ASR reports say threshold, TTS ones limit

    return [{**base, "gate": g.get("name"), "passed": g.get("passed"),
             "value": None if g.get("value") is None else float(g["value"]),
             "threshold": None if limit(g) is None else float(limit(g)),
             "description": g.get("description")} for g in gates]


def export(store: StateStore, out: str | os.PathLike[str], fmt: str = "parquet", dialects: Iterable[str] = (),
           now: datetime | None = None) -> Path:
    """Write one versioned export under ``out``; returns its directory."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    now = now or datetime.now(UTC)
    root = Path(out)
    target = root / f"mloc-export-{now.strftime('%Y%m%dT%H%M%S%fZ')}"
    try:
        target.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise ExportError(f"cannot create {target}: {exc.strerror or exc}") from exc
    rows = collect(store, dialects)
    manifest: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "format": fmt, "created_at": now.isoformat(),
                                "state_store": redact_url(store.url), "tables": {}}
    try:
        for name, schema in TABLES.items():
            table = pa.Table.from_pylist(rows[name], schema=schema)
            if fmt == "parquet":
                pq.write_table(table, target / f"{name}.parquet")
            else:
                (target / f"{name}.json").write_text(json.dumps(rows[name], default=_iso, indent=1) + "\n")
            manifest["tables"][name] = {"file": f"{name}.{fmt}", "rows": table.num_rows,
                                        "columns": {f.name: str(f.type) for f in schema}}
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise ExportError(f"cannot write the export under {target}: {exc.strerror or exc}") from exc
    return target


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON-able: {type(value).__name__}")
