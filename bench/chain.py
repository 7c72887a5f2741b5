"""Training-chain benchmark.

    .venv/bin/python bench/chain.py [--ticks-only] [--out bench/results/chain.json]

1. sensor tick time with 100 vs 10,000 historical runs (Dagster run records of the training job,
   and finished training runs in the state store), 3 active runs each time (ratio; goal <= 1.5);
2. chain gap: job i's Dagster RUN_SUCCESS → job i+1's first training step, median over >= 5
   transitions of a real chain driven by the real `dagster-daemon` (goal <= 15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
console = Console()


def tick_time(n_history: int, repeats: int = 7) -> float:
    import dagster as dg

    from mloc_dagster.core.state import StateStore
    from mloc_dagster.definitions import defs
    from mloc_dagster.jobs import TRAIN_JOB
    from mloc_dagster.resources.state import StateStoreResource
    from mloc_dagster.sensors.training_chain import training_chain_sensor

    work = Path(tempfile.mkdtemp(prefix="mloc-bench-chain-"))
    try:
        store = StateStore(f"sqlite:///{work / 'state.db'}")
        (work / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(work / "dagster")) as instance:
            for i in range(n_history):
                run = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                                       timebox_s=60, max_jobs=1, candidate_every=1)
                store.transition_run(run.run_id, "active", "completed" if i % 10 else "failed", "history")
                status = dg.DagsterRunStatus.SUCCESS if i % 10 else dg.DagsterRunStatus.FAILURE
                instance.add_run(dg.DagsterRun(job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=status,
                                               tags={"mloc/run_id": run.run_id, "mloc/job_index": "0"}))
            for _ in range(3):
                store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                                 timebox_s=60, max_jobs=100, candidate_every=6)
            resources = {"state": StateStoreResource(url=store.url)}
            cursor = None
            times = []
            for _ in range(repeats):
                ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=resources)
                t0 = time.perf_counter()
                result = training_chain_sensor(ctx)
                times.append(time.perf_counter() - t0)
                cursor = result.cursor
        return statistics.median(times[1:])  # the first tick reads the failure history once
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticks-only", action="store_true")
    ap.add_argument("--history", type=int, nargs=2, default=[100, 10_000])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chain.json")
    args = ap.parse_args()

    small, large = args.history
    results: dict = {}
    t_small = tick_time(small)
    t_large = tick_time(large)
    results.update({f"tick_ms_{small}_runs": t_small * 1000, f"tick_ms_{large}_runs": t_large * 1000,
                    "tick_ratio": t_large / t_small})
    if not args.ticks_only:
        results.update(chain_gap())

    table = Table(title="training chain")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")


def chain_gap(jobs: int = 6, timebox_s: int = 15) -> dict:
    raise NotImplementedError


if __name__ == "__main__":
    main()
