"""The pool on a real Ray cluster: launch overhead against the embedded default, and one distributed
round's makespan against the placement optimum (issue 19 item 6).

    nice -n 10 .venv/bin/python bench/pool_ray.py [--runs 3] [--steps 60] [--speeds 1,2,4] [--slowest 8] \\
        [--round-samples 1400] [--json bench/results/pool_ray.json]

Real: the Dagster daemon, Postgres, a Ray head and one worker node per speed, each node in its own
network namespace (``tests/deploy/ray_cluster.py``, the suite's cluster; root and iproute2 needed),
joined with ``mloc node join``, every run launched by ``deploy/ray/dagster.yaml``'s launcher.

1. **Launch overhead.** ``--runs`` single training runs of one job of ``--steps`` steps, one after
   another, first on the embedded default (SQLite, the warm-fork launcher, one process of this
   machine), then on the Ray cluster (the job placed on a node: a Ray job on it). Per run: Dagster
   run created → the job's first step, its last step → the run ended, and the sum (the run's
   wall minus its training). The first run of each pays the feature extraction and the model's
   first load; the goal compares the median of the others: Ray ≤ default + 5 s.
2. **Round makespan.** The nodes are throttled to the relative ``--speeds`` (the slowest
   ``--slowest`` × slower than this machine, so that all of them training at once stay within two
   cores; ``MLOC_SIMULATED_NODE_THROTTLE`` in each node's environment), calibrated with those
   speeds, and one distributed run of one round of ``--round-samples`` is placed on them. Makespan
   = the first slice's first step → the last slice's last step; the optimum is
   ``core.pool.placement.optimal_makespan`` for the speeds the slices measured. Goal ≤ 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rich.console import Console  # noqa: E402

from bench.report import report  # noqa: E402

console = Console(width=150)
DIALECT = "en-gb-scotland"
UTTERANCES = 120


def job_times(instance, store, run_id: str) -> dict:
    """Job 0 of ``run_id``: created → first step, last step → ended, training, from Dagster's run
    record and the job's result.json."""
    import dagster as dg

    [record] = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": run_id}))
    job = store.get_job(run_id, 0)
    result = json.loads((Path(job.checkpoint_path) / "result.json").read_text())
    created, ended = record.create_timestamp.timestamp(), record.end_time
    first, train = result["first_step_at"], result["train_seconds"]
    return {"start_s": first - created, "tail_s": ended - (first + train), "train_s": train,
            "overhead_s": ended - created - train, "node": record.dagster_run.tags.get("mloc/node", "-"),
            "samples_per_s": result["samples_per_s"]}


def single_runs(instance, store, n: int, steps: int) -> list[dict]:
    from mloc_dagster.runs.service import StartRequest, start_run

    out = []
    for _ in range(n):
        run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                                                      hparams={"batch_size": 16, "max_steps": steps}))
        wait(lambda run=run: store.get_job(run.run_id, 0) is not None and store.get_job(run.run_id, 0).status
             in ("succeeded", "failed"), 900, f"run {run.run_id}'s job")
        if store.get_job(run.run_id, 0).status != "succeeded":
            raise RuntimeError(f"run {run.run_id}: {store.get_job(run.run_id, 0)}")
        time.sleep(3)  # the run's end is recorded just after the job's
        out.append(job_times(instance, store, run.run_id))
        console.print(f"  {out[-1]}")
    return out


def wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(1.0)


def on_the_default(args) -> list[dict]:
    from line_home import line_home

    with line_home({"en-us": UTTERANCES, DIALECT: UTTERANCES}) as (_home, instance, store):
        console.print(f"embedded default: {args.runs} single runs of {args.steps} steps")
        return single_runs(instance, store, args.runs, args.steps)


def on_ray(args, pg) -> tuple[list[dict], dict]:
    import dagster as dg

    from mloc_dagster.core.data.corpus import synth_dialect
    from mloc_dagster.core.state import StateStore
    from tests.conftest_pg import fresh_database
    from tests.daemon import Daemon
    from tests.deploy.ray_cluster import RayPool
    from tests.world import populate_home, tiny_base

    speeds = [float(s) for s in args.speeds.split(",")]
    home = Path(tempfile.mkdtemp(prefix="mloc-bench-ray-"))
    url = lambda db: f"postgresql+psycopg2://{pg.user}@/{db}?host={pg.datadir.parent}&port={pg.port}"  # noqa: E731
    with fresh_database(pg) as dagster_db, fresh_database(pg) as state_db:
        (home / "dagster").mkdir()
        shutil.copy(REPO / "deploy" / "ray" / "dagster.yaml", home / "dagster" / "dagster.yaml")
        env = {"MLOC_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "DAGSTER_PG_URL": url(dagster_db),
               "MLOC_DATABASE_URL": url(state_db), "MLOC_RAY_GPUS_PER_RUN": "0"}
        cluster = RayPool({**os.environ, **env}, nodes=len(speeds))
        throttle = {n: args.slowest * min(speeds) / s for n, s in zip(cluster.node_ids, speeds, strict=True)}
        cluster.env["MLOC_SIMULATED_NODE_THROTTLE"] = json.dumps(throttle)
        os.environ.update(cluster.env)
        daemon = None
        try:
            with dg.DagsterInstance.get() as instance:
                batch = synth_dialect(DIALECT, UTTERANCES, home / "synth", seed=0)
                base = populate_home(instance, home, {"en-us": batch, DIALECT: batch}, tiny_base(home / "tiny"))
            cluster.start()
            for node_id in cluster.node_ids:
                cluster.join(node_id)
            wait(lambda: alive(cluster), 240, "every node alive in the Ray cluster")
            instance = dg.DagsterInstance.get()
            store = StateStore(env["MLOC_DATABASE_URL"])
            calibrate(store, base, {n: 50.0 / t for n, t in throttle.items()})  # chained jobs go to the fastest
            daemon = Daemon(home, **cluster.env)
            daemon.start()
            console.print(f"Ray cluster: {len(speeds)} nodes; {args.runs} single runs of {args.steps} steps")
            runs = single_runs(instance, store, args.runs, args.steps)
            v0 = statistics.median(r["samples_per_s"] for r in runs[1:] or runs)  # one unthrottled node
            calibrate(store, base, {n: v0 / t for n, t in throttle.items()})
            round_ = one_round(instance, store, args, {n: v0 / t for n, t in throttle.items()})
            return runs, round_
        finally:
            if daemon is not None:
                daemon.stop()
            cluster.close()
            shutil.rmtree(home, ignore_errors=True)


def alive(cluster) -> bool:
    from mloc_dagster.core.pool.ray_cluster import RayUnreachable, ray_node_table

    for node_id in cluster.node_ids:
        cluster.keep_joined(node_id)
    try:
        table = ray_node_table(cluster.dashboard, cluster.token, timeout_s=2)
    except RayUnreachable:
        return False
    return all(n in table and table[n].alive for n in cluster.node_ids)


def calibrate(store, base: str, speed: dict[str, float]) -> None:
    """What `mloc node calibrate` records: each node's samples/s for the base model."""
    from mloc_dagster.core.pool.rounds import base_model_hash

    for node_id, v in speed.items():
        store.record_job_throughput(node_id, base_model_hash(base), v, source="calibrate")


def one_round(instance, store, args, speed: dict[str, float]) -> dict:
    from mloc_dagster.core.pool.placement import optimal_makespan
    from mloc_dagster.runs.service import StartRequest, start_run

    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=900,
                                                  hparams={"batch_size": 16}, kind="distributed",
                                                  parallelism=len(speed), round_samples=args.round_samples))
    console.print(f"one round of {args.round_samples} samples on nodes of {speed} samples/s")
    wait(lambda: (j := store.get_job(run.run_id, 0)) is not None and j.status == "succeeded", 1800, "the round")
    every = store.round_slices(run.run_id, 0)
    slices = [s for s in every if s.status == "succeeded"]
    if len(slices) != len(every):  # a dropped or failed slice: not a clean measurement of the placement
        console.print(f"[red]not every slice succeeded: {[(s.node_id, s.status, s.outcome, s.error) for s in every]}[/]")
    starts = [s.metrics["first_step_at"] for s in slices]
    ends = [s.metrics["first_step_at"] + s.metrics["train_seconds"] for s in slices]
    measured = [s.samples / s.metrics["train_seconds"] for s in slices]
    makespan, best = max(ends) - min(starts), optimal_makespan(measured, sum(s.samples for s in slices))
    return {"makespan_s": makespan, "optimum_s": best, "ratio": makespan / best,
            "slices": [{"node": s.node_id, "samples": s.samples, "expected_s": round(s.expected_s, 1), "status": s.status,
                        "train_s": round(s.metrics["train_seconds"], 1) if s.metrics else None,
                        "starts_after_s": round(s.metrics["first_step_at"] - min(starts), 1) if s.metrics else None}
                       for s in every]}


def summary(args, default: list[dict], ray: list[dict], round_: dict) -> dict:
    steady = lambda rows: rows[1:] or rows  # noqa: E731 - the first run pays the features and the first load
    results: dict = {}
    for name, rows in (("embedded default", default), ("Ray", ray)):
        for i, r in enumerate(rows):
            results[f"{name} run {i + 1}: created → first step / last step → ended / training s"] = \
                f"{r['start_s']:.1f} / {r['tail_s']:.1f} / {r['train_s']:.1f}" + (f" ({r['node']})" if r["node"] != "-" else "")
        results[f"{name}: median overhead s (runs 2..)"] = statistics.median(r["overhead_s"] for r in steady(rows))
    extra = results["Ray: median overhead s (runs 2..)"] - results["embedded default: median overhead s (runs 2..)"]
    results["launch overhead of Ray over the default s"] = extra
    results["goal: ≤ 5 s"] = extra <= 5.0
    for s in round_["slices"]:
        results[f"round slice on {s['node']}: samples / expected s / training s / first step after s"] = \
            f"{s['samples']} / {s['expected_s']} / {s['train_s']} / {s['starts_after_s']}" + \
            ("" if s["status"] == "succeeded" else f" ({s['status']})")
    results["round makespan s"] = round_["makespan_s"]
    results["placement optimum s (measured speeds)"] = round_["optimum_s"]
    results["makespan / optimum"] = round_["ratio"]
    results["goal: ≤ 1.15"] = round_["ratio"] <= 1.15
    results["command"] = " ".join(sys.argv[1:])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--speeds", default="1,2,4")
    ap.add_argument("--slowest", type=float, default=8.0, help="how many times slower than this machine the slowest node is")
    ap.add_argument("--round-samples", type=int, default=1400)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "pool_ray.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still tears the cluster down
    from tests.conftest_pg import postgres_server
    from tests.deploy.ray_cluster import netns_available

    if not netns_available():
        sys.exit("bench/pool_ray.py needs network namespaces (root and iproute2)")
    saved = dict(os.environ)
    default = on_the_default(args)
    os.environ.clear()
    os.environ.update(saved)
    with postgres_server() as pg:
        ray, round_ = on_ray(args, pg)
    report("The pool on a Ray cluster (bench/pool_ray.py)", summary(args, default, ray, round_), args.json, console)


if __name__ == "__main__":
    main()
