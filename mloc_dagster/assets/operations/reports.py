"""pool_report: how the shared pool is doing, as a markdown report in the UI (daily, or by hand).

Success rate per job kind, failure reasons, GPU-hours per dialect and per node, and dev CER per
dialect over time, drawn as text charts so they render anywhere markdown does. The headline
numbers are also numeric metadata, which the UI plots across the daily materializations.
"""

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from mloc_dagster.operations.export import collect
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.state import StateStoreResource

BAR_WIDTH = 30
SPARK = "▁▂▃▄▅▆▇█"


def bar(value: float, top: float) -> str:
    filled = 0 if top <= 0 else round(BAR_WIDTH * value / top)
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[round((v - lo) / span * (len(SPARK) - 1))] for v in values)


def failure_reason(error: str | None) -> str:
    """The first line of an error, without the run-specific tail, as a grouping key."""
    line = (error or "unknown").strip().splitlines()[0] if (error or "").strip() else "unknown"
    return line[:90]


def pool_stats(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The report's numbers, from the export's rows (``mloc_dagster.operations.export.collect``)."""
    jobs = rows["jobs"]
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    hours_dialect: Counter[str] = Counter()
    hours_node: Counter[str] = Counter()
    cer: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for j in jobs:
        by_kind[j["kind"]][j["status"]] += 1
        if j["duration_s"]:
            hours_dialect[j["dialect"]] += j["duration_s"] / 3600
            hours_node[j["node_id"] or "unknown"] += j["duration_s"] / 3600
        if j["dev_cer"] is not None and j["finished_at"] is not None:
            cer[j["dialect"]].append((j["finished_at"].isoformat(), j["dev_cer"]))
    success = {}
    for kind, counts in sorted(by_kind.items()):
        finished = counts["succeeded"] + counts["failed"]
        success[kind] = {"succeeded": counts["succeeded"], "failed": counts["failed"],
                         "rate": counts["succeeded"] / finished if finished else None}
    failures = Counter(failure_reason(j["error"]) for j in jobs if j["status"] == "failed")
    gates = Counter(c["gate_decision"] or "pending" for c in rows["candidates"])
    done = sum(s["succeeded"] + s["failed"] for s in success.values())
    return {
        "success": success,
        "success_rate": sum(s["succeeded"] for s in success.values()) / done if done else None,
        "failures": failures.most_common(10),
        "gpu_hours_by_dialect": dict(sorted(hours_dialect.items())),
        "gpu_hours_by_node": dict(sorted(hours_node.items())),
        "dev_cer_by_dialect": {d: sorted(points) for d, points in sorted(cer.items())},
        "runs": Counter(r["status"] for r in rows["runs"]),
        "candidates": gates,
        "promotions": Counter(f"{p['dialect']}/{p['branch']}" for p in rows["promotions"]),
    }


def render(stats: dict[str, Any], now: datetime) -> str:
    lines = [f"# Pool report, {now:%Y-%m-%d %H:%M} UTC", ""]
    runs = ", ".join(f"{n} {s}" for s, n in sorted(stats["runs"].items())) or "none"
    gates = ", ".join(f"{n} {s}" for s, n in sorted(stats["candidates"].items())) or "none"
    lines += [f"Training runs: {runs}. Candidates: {gates}. "
              f"Promotions: {sum(stats['promotions'].values())}.", ""]

    lines += ["## Success rate per job kind", "", "```"]
    for kind, s in stats["success"].items():
        rate = s["rate"]
        shown = "   n/a" if rate is None else f"{rate:6.1%}"
        lines.append(f"{kind:<15} {bar(rate or 0.0, 1.0)} {shown}  ({s['succeeded']} ok, {s['failed']} failed)")
    if not stats["success"]:
        lines.append("(no training job yet)")
    lines += ["```", ""]

    lines += ["## Failure reasons", ""]
    if stats["failures"]:
        lines += ["| jobs | reason |", "|---:|---|"]
        lines += [f"| {n} | `{reason.replace('|', '/')}` |" for reason, n in stats["failures"]]
    else:
        lines.append("No failed job.")
    lines.append("")

    for title, key in (("GPU-hours per dialect", "gpu_hours_by_dialect"), ("GPU-hours per node", "gpu_hours_by_node")):
        values = stats[key]
        lines += [f"## {title}", "", "```"]
        top = max(values.values(), default=0.0)
        lines += [f"{name:<20} {bar(h, top)} {h:8.3f} h" for name, h in values.items()] or ["(none yet)"]
        lines += ["```", ""]

    lines += ["## Dev CER per dialect over time", "", "```"]
    for dialect, points in stats["dev_cer_by_dialect"].items():
        values = [v for _, v in points]
        lines.append(f"{dialect:<20} {sparkline(values)}  first {values[0]:.3f}  last {values[-1]:.3f}  "
                     f"best {min(values):.3f}  ({len(values)} jobs, {points[0][0][:10]} → {points[-1][0][:10]})")
    if not stats["dev_cer_by_dialect"]:
        lines.append("(no evaluated job yet)")
    lines += ["```", ""]
    return "\n".join(lines)


@dg.asset(group_name="reports", kinds={"markdown"}, code_version="1",
          description="How the shared pool is doing: success rate per job kind, failure reasons, GPU-hours per "
                      "dialect and node, dev CER per dialect over time. Daily, or materialize by hand.")
def pool_report(context: dg.AssetExecutionContext, state: StateStoreResource,
                artifacts: ArtifactStore) -> dg.MaterializeResult:
    now = datetime.now(UTC)
    dialects = context.instance.get_dynamic_partitions(dialect_partitions.name)
    stats = pool_stats(collect(state.store(), dialects))
    markdown = render(stats, now)
    out = artifacts.paths.reports / "pool" / f"pool-{now:%Y%m%dT%H%M%SZ}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=1, default=str))
    jobs_done = sum(s["succeeded"] + s["failed"] for s in stats["success"].values())
    metadata: dict[str, Any] = {
        "report": dg.MetadataValue.md(markdown),
        "path": dg.MetadataValue.path(str(out.with_suffix(".md"))),
        "jobs_finished": jobs_done,
        "jobs_failed": sum(s["failed"] for s in stats["success"].values()),
        "gpu_hours": round(sum(stats["gpu_hours_by_dialect"].values()), 4),
        "candidates": sum(stats["candidates"].values()),
        "promotions": sum(stats["promotions"].values()),
    }
    if stats["success_rate"] is not None:
        metadata["success_rate"] = round(stats["success_rate"], 4)
    return dg.MaterializeResult(metadata=metadata)


pool_report_job = dg.define_asset_job("pool_report_job", selection=[pool_report],
                                      description="Render the pool report (also run daily by pool_report_daily).")
pool_report_daily = dg.ScheduleDefinition(name="pool_report_daily", job=pool_report_job, cron_schedule="0 6 * * *",
                                          execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING)

defs = dg.Definitions(assets=[pool_report], jobs=[pool_report_job], schedules=[pool_report_daily])
