"""Prometheus metrics of the whole line: training runs and jobs, chain gaps, candidates, gates,
promotions, Dagster's run queue, and the node's GPU arbiter.

Training state lives in the state store and in Dagster's run storage, so it is read at scrape
time by ``LineCollector`` (gauges: what is true now). The arbiter's counters and histograms are
written by every step process in prometheus_client's multiprocess mode and summed here
(``mloc_dagster.core.arbiter.metrics``). ``registry()`` puts both together for
``mloc metrics serve`` and the textfile.

| metric | labels |
|---|---|
| ``mloc_training_runs`` | dialect, kind, status |
| ``mloc_training_jobs`` | dialect, kind, status (queued, running, succeeded, failed) |
| ``mloc_training_job_attempts`` | dialect, kind (attempts beyond the first: Dagster retries) |
| ``mloc_training_chain_gap_seconds`` | dialect, run_id: last gap between a job's end and the next start |
| ``mloc_training_chain_idle_seconds`` | dialect, run_id: an active run with nothing queued or running |
| ``mloc_candidates`` | dialect, trusted, gate (passed, failed, pending) |
| ``mloc_promotions`` | dialect, branch |
| ``mloc_dagster_runs`` | job, status (in-flight runs by job; all runs by status with job "all") |
| ``mloc_node_reputation`` | node |
| ``mloc_node_samples_per_second`` | node, base_model (first 12 characters of its hash) |
| ``mloc_node_last_seen_timestamp_seconds`` | node (unix time of the last heartbeat) |
| ``mloc_node_jobs_today`` / ``mloc_node_daily_quota`` | node |
| ``mloc_node_available`` | node, reason (1 when it may take work now; else 0 and why) |
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mloc_dagster.core.arbiter.metrics import LeaseStoreGauges, multiprocess_dir
from mloc_dagster.core.state import StateStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464  # the port Prometheus' exporter registry lists for "application metrics"
DAGSTER_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "SUCCESS", "FAILURE", "CANCELING", "CANCELED")
IN_FLIGHT = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
JOB_STATUSES = ("queued", "running", "succeeded", "failed")
DIALECT_PARTITIONS = "dialect"


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class LineCollector(Collector):
    """Training line state from the state store (and Dagster's run storage when an instance is given)."""

    def __init__(self, store: StateStore, instance: Any | None = None, max_runs: int = 1000) -> None:
        self.store = store
        self.instance = instance
        self.max_runs = max_runs

    def collect(self) -> Iterator[Any]:
        started = time.monotonic()
        yield from self._training()
        yield from self._nodes()
        if self.instance is not None:
            yield from self._dagster_runs()
        took = GaugeMetricFamily("mloc_metrics_scrape_seconds", "Time to read the line's state for this scrape.")
        took.add_metric([], time.monotonic() - started)
        yield took

    def dialects(self, runs: list[Any]) -> list[str]:
        found = {r.dialect for r in runs}
        if self.instance is not None:
            try:
                found |= set(self.instance.get_dynamic_partitions(DIALECT_PARTITIONS))
            except Exception as exc:  # the instance may not know the partitions yet
                log.debug("no dialect partitions: %s", exc)
        return sorted(found)

    def _training(self) -> Iterator[Any]:
        runs = self.store.list_runs(limit=self.max_runs)
        labels = ["dialect", "kind", "status"]
        run_gauge = GaugeMetricFamily("mloc_training_runs", "Training runs by status.", labels=labels)
        job_gauge = GaugeMetricFamily("mloc_training_jobs", "Training jobs by status.", labels=labels)
        retries = GaugeMetricFamily(
            "mloc_training_job_attempts", "Attempts beyond the first (Dagster run retries).", labels=["dialect", "kind"]
        )
        gap = GaugeMetricFamily(
            "mloc_training_chain_gap_seconds",
            "Last gap between a job's end and the start of the next job of the run.",
            labels=["dialect", "run_id"],
        )
        idle = GaugeMetricFamily(
            "mloc_training_chain_idle_seconds",
            "An active run with no job queued or running: seconds since its last job ended.",
            labels=["dialect", "run_id"],
        )
        run_counts: Counter[tuple[str, str, str]] = Counter()
        job_counts: Counter[tuple[str, str, str]] = Counter()
        extra_attempts: Counter[tuple[str, str]] = Counter()
        now = time.time()
        for run in runs:
            kind = run.kind
            run_counts[(run.dialect, kind, run.status)] += 1
            jobs = self.store.jobs_for_run(run.run_id)
            for job in jobs:
                job_counts[(run.dialect, kind, job.status)] += 1
                extra_attempts[(run.dialect, kind)] += max(0, (job.attempts or 0) - 1)
            gaps = [
                _ts(b.started_at) - _ts(a.finished_at)
                for a, b in zip(jobs, jobs[1:])
                if _ts(a.finished_at) is not None and _ts(b.started_at) is not None
            ]
            if gaps:
                gap.add_metric([run.dialect, run.run_id], max(0.0, gaps[-1]))
            in_flight = any(j.status in ("queued", "running") for j in jobs)
            finished = [_ts(j.finished_at) for j in jobs if _ts(j.finished_at) is not None]
            if run.status == "active" and not in_flight and finished:
                idle.add_metric([run.dialect, run.run_id], max(0.0, now - max(finished)))
        for (dialect, kind), n in sorted(extra_attempts.items()):
            retries.add_metric([dialect, kind], n)
        for key, n in sorted(run_counts.items()):
            run_gauge.add_metric(list(key), n)
        # Every job status of every (dialect, kind) seen, 0 included, so an alert sees the series.
        for dialect, kind in sorted({(d, k) for d, k, _ in job_counts} | {(d, k) for d, k, _ in run_counts}):
            for status in sorted(set(JOB_STATUSES) | {s for d, k, s in job_counts if (d, k) == (dialect, kind)}):
                job_gauge.add_metric([dialect, kind, status], job_counts.get((dialect, kind, status), 0))
        yield from (run_gauge, job_gauge, retries, gap, idle)

        candidates = GaugeMetricFamily(
            "mloc_candidates", "Merged candidates by gate outcome.", labels=["dialect", "trusted", "gate"]
        )
        promotions = GaugeMetricFamily("mloc_promotions", "Promotions by branch.", labels=["dialect", "branch"])
        for dialect in self.dialects(runs):
            outcome: Counter[tuple[str, str]] = Counter(
                ("true" if c.trusted else "false", c.gate_decision or "pending")
                for c in self.store.list_candidates(dialect, limit=None)
            )
            for (trusted, gate_decision), n in sorted(outcome.items()):
                candidates.add_metric([dialect, trusted, gate_decision], n)
            for branch, n in sorted(Counter(p.branch for p in self.store.list_promotions(dialect, limit=None)).items()):
                promotions.add_metric([dialect, branch], n)
        yield from (candidates, promotions)

    def _nodes(self) -> Iterator[Any]:
        """The node registry (docs/pool.md)."""
        from mloc_dagster.core.pool.placement import unavailable_reason
        from mloc_dagster.core.pool.ray_cluster import RayUnreachable, pool_ray_table
        from mloc_dagster.core.state.nodes import default_daily_quota, node_ttl_s

        now, ttl, default_quota = datetime.now(UTC), node_ttl_s(), default_daily_quota()
        try:
            ray = pool_ray_table()  # on a Ray pool, liveness is Ray's
        except RayUnreachable:
            ray = {}  # the head is away: no node is known alive
        reputation = GaugeMetricFamily("mloc_node_reputation", "Trust in a node's adapters, in [0, 1].", labels=["node"])
        speed = GaugeMetricFamily("mloc_node_samples_per_second", "Measured training throughput per base model.",
                                  labels=["node", "base_model"])
        seen = GaugeMetricFamily("mloc_node_last_seen_timestamp_seconds", "Unix time of the node's last heartbeat.",
                                 labels=["node"])
        jobs = GaugeMetricFamily("mloc_node_jobs_today", "Training jobs taken today (UTC).", labels=["node"])
        quota = GaugeMetricFamily("mloc_node_daily_quota", "Training jobs the node may take per UTC day.", labels=["node"])
        available = GaugeMetricFamily("mloc_node_available", "1 when the node may take new work now.",
                                      labels=["node", "reason"])
        for n in self.store.list_nodes():
            reputation.add_metric([n.node_id], n.reputation)
            for base_model, figure in sorted(n.throughput.items()):
                speed.add_metric([n.node_id, base_model[:12]], float(figure["samples_per_s"]))
            if n.last_seen_at is not None:
                seen.add_metric([n.node_id], _ts(n.last_seen_at))
            jobs.add_metric([n.node_id], n.jobs_taken(now.date().isoformat()))
            quota.add_metric([n.node_id], default_quota if n.daily_quota is None else n.daily_quota)
            reason = unavailable_reason(n, now=now, ttl_s=ttl, default_quota=default_quota, ray=ray)
            available.add_metric([n.node_id, (reason or "").split(":")[0]], 0 if reason else 1)
        yield from (reputation, speed, seen, jobs, quota, available)

    def _dagster_runs(self) -> Iterator[Any]:
        import dagster as dg

        family = GaugeMetricFamily("mloc_dagster_runs", "Dagster runs by job and status.", labels=["job", "status"])
        for status in DAGSTER_STATUSES:
            count = self.instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus(status)]))
            family.add_metric(["all", status], count)
        in_flight = self.instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in IN_FLIGHT]), limit=self.max_runs
        )
        by_job = Counter((r.dagster_run.job_name, r.dagster_run.status.value) for r in in_flight)
        for (job, status), n in sorted(by_job.items()):
            family.add_metric([job, status], n)
        yield family


def registry(
    store: StateStore | None, instance: Any | None = None, gpu_state_dir: str | os.PathLike[str] | None = None
) -> CollectorRegistry:
    """The line's collectors, every process's arbiter counters, and the lease store's gauges."""
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(multiprocess_dir()))
    if gpu_state_dir is not None:
        reg.register(LeaseStoreGauges(Path(gpu_state_dir) / "arbiter.sqlite"))
    if store is not None:
        reg.register(LineCollector(store, instance))
    return reg


def exposition(reg: CollectorRegistry) -> str:
    return generate_latest(reg).decode()


def write_textfile(reg: CollectorRegistry, path: str | os.PathLike[str]) -> Path:
    """Atomically (temp file + rename), as node-exporter's textfile collector wants it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(target), reg)
    return target
