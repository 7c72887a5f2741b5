"""Training-chain benchmark.

    .venv/bin/python bench/chain.py [--ticks-only] [--out bench/results/chain.json]

1. sensor tick time with 100 vs 10,000 historical runs (Dagster run records of the training job,
   and finished training runs in the state store), 3 active runs each time (ratio; goal <= 1.5);
2. chain gap: job i's Dagster RUN_SUCCESS → job i+1's first training step, median over >= 5
   transitions of a real chain driven by the real `dagster-daemon` (goal <= 8 s), with its
   breakdown: request, queue+launch, start-up, lease, first step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import report  # noqa: E402

console = Console()


def tick_time(n_history: int, repeats: int = 7) -> float:
    import dagster as dg

    from mloc_dagster.assets.training.adapters import TRAIN_JOB
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.definitions import defs
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

            def tick(cursor):
                ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=resources)
                t0 = time.perf_counter()
                result = training_chain_sensor(ctx)
                return time.perf_counter() - t0, result.cursor

            # A new sensor first pages through old failures (100 a tick); steady state comes after.
            catch_up, cursor, previous = [], None, "start"
            while cursor != previous:
                previous = cursor
                elapsed, cursor = tick(cursor)
                catch_up.append(elapsed)
            steady = [tick(cursor)[0] for _ in range(repeats)]
        return {"steady_ms": statistics.median(steady) * 1000, "catch_up_ticks": len(catch_up),
                "catch_up_max_ms": max(catch_up) * 1000}
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
    t_small, t_large = tick_time(small), tick_time(large)
    results.update({f"tick_ms_{small}_runs": t_small["steady_ms"], f"tick_ms_{large}_runs": t_large["steady_ms"],
                    "tick_ratio": t_large["steady_ms"] / t_small["steady_ms"],
                    f"catch_up_ticks_{large}_runs": t_large["catch_up_ticks"],
                    f"catch_up_max_tick_ms_{large}_runs": t_large["catch_up_max_ms"]})
    if not args.ticks_only:
        results.update(chain_gap())

    report("training chain", results, args.out, console)


def chain_gap(jobs: int = 6, steps_per_job: int = 10) -> dict:
    """A real chain on a temporary home with the demo's en-us and Scottish data and hparams,
    driven by `dagster-daemon run`."""
    import dagster as dg
    from line_home import line_home

    from mloc_dagster.cli.demo import BASE_DIALECT, DEMO_DIALECTS, DEMO_HPARAMS, TARGET_DIALECT
    from mloc_dagster.runs.service import StartRequest, start_run

    data = {d: DEMO_DIALECTS[d] for d in (BASE_DIALECT, TARGET_DIALECT)}
    with line_home(data) as (_home, instance, store):
        run = start_run(instance, store, StartRequest(TARGET_DIALECT, jobs=jobs, candidate_every=12, timebox_s=300,
                        hparams={**DEMO_HPARAMS, "max_steps": steps_per_job}))
        console.print(f"chain of {jobs} jobs ({steps_per_job} steps each) on the real daemon ...")
        deadline = time.time() + 1200
        while store.get_run(run.run_id).status != "completed" and time.time() < deadline:
            time.sleep(2)
        records = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run.run_id},
                                                         statuses=[dg.DagsterRunStatus.SUCCESS]),
                                           order_by="create_timestamp", ascending=True)
        by_index = {int(r.dagster_run.tags["mloc/job_index"]): r for r in records}

        def moments(record) -> dict:
            """When the job's run was created and started, its step started, its lease was
            granted and its first training step ran (unix seconds, from Dagster's records)."""
            logs = instance.all_logs(record.dagster_run.run_id)
            step_start = next(e.timestamp for e in logs if e.dagster_event is not None
                              and e.dagster_event.event_type == dg.DagsterEventType.STEP_START)
            leased = next(e.timestamp for e in logs if "GPU lease ACQUIRED" in (e.user_message or ""))
            mat = next(e for e in logs if e.dagster_event is not None
                       and e.dagster_event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION)
            return {"created": record.create_timestamp.timestamp(), "started": record.start_time,
                    "step": step_start, "leased": leased,
                    "first_step": mat.asset_materialization.metadata["first_step_at"].value}

        parts = {k: [] for k in ("gap", "request", "queue_launch", "startup", "lease", "first_step")}
        for i in range(jobs - 1):
            end, m = by_index[i].end_time, moments(by_index[i + 1])
            for key, value in (("gap", m["first_step"] - end), ("request", m["created"] - end),
                               ("queue_launch", m["started"] - m["created"]), ("startup", m["step"] - m["started"]),
                               ("lease", m["leased"] - m["step"]), ("first_step", m["first_step"] - m["leased"])):
                parts[key].append(value)
    gaps = parts.pop("gap")
    return {"transitions": len(gaps), "chain_gap_s_median": statistics.median(gaps),
            "chain_gap_s_max": max(gaps), "chain_gap_s_all": [round(g, 2) for g in gaps],
            # The gap's parts, median of each: RUN_SUCCESS → next run created (the sensor),
            # created → RUN_START (queue, launch, imports), RUN_START → STEP_START, STEP_START →
            # device lease granted, lease → first training step (model, checkpoint, features).
            **{f"{key}_s_median": statistics.median(values) for key, values in parts.items()}}

if __name__ == "__main__":
    main()
