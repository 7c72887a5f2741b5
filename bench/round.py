"""A distributed round's overhead on the embedded default: what a round of N simulated slices costs
beyond the slices' own training.

    .venv/bin/python bench/round.py [--slices 4] [--slice-samples 1600] [--out bench/results/round.json]

One distributed run, one round, N simulated nodes of equal calibrated speed on this machine, the real
`dagster-daemon` (warm-fork launcher, one process per run). The slices' runs start together and
wait for the `gpu` pool (one device: they train one after another), so their start-ups overlap the
training of the others. Reported, from Dagster's run records and the slices' own metrics:

- ``slices_span_s``: the first slice run created → the last slice run ended;
- ``slices_train_s``: the sum of the slices' own training time (first to last step, ``train_seconds``);
- ``overhead_ratio = slices_span_s / slices_train_s`` (goal ≤ 1.2);
- ``round_span_s`` and ``round_ratio``: the same up to the round's merge (``round_merge_job``) ended.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from line_home import line_home  # noqa: E402
from report import report  # noqa: E402

console = Console()


def round_overhead(slices: int, slice_samples: int) -> dict:
    import dagster as dg

    from mloc_dagster.core.rounds import base_model_hash
    from mloc_dagster.demo import BASE_DIALECT, DEMO_DIALECTS, TARGET_DIALECT
    from mloc_dagster.training_runs import start_run

    data = {d: DEMO_DIALECTS[d] for d in (BASE_DIALECT, TARGET_DIALECT)}
    with line_home(data, env={"MLOC_NODE_TTL_S": "3600"}) as (_home, instance, store):
        run = start_run(instance, store, TARGET_DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                        hparams={"batch_size": 16}, kind="distributed", parallelism=slices,
                        round_samples=slices * slice_samples)
        for i in range(slices):
            store.record_job_throughput(f"sim-{i}", base_model_hash(run.base_model_version), 50.0, source="calibrate")
        console.print(f"one round of {slices} slices x {slice_samples} samples on the real daemon ...")
        deadline = time.time() + 1800
        while store.get_job(run.run_id, 0) is None or store.get_job(run.run_id, 0).status != "succeeded":
            if time.time() > deadline or store.get_run(run.run_id).status in ("failed", "paused", "cancelled"):
                raise RuntimeError(f"the round did not finish: {store.get_run(run.run_id)}")
            time.sleep(2)
        tags = {"mloc/run_id": run.run_id, "mloc/round": "0"}
        slice_runs = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags=tags))
        merge = instance.get_run_records(dg.RunsFilter(job_name="round_merge_job", tags=tags,
                                                       statuses=[dg.DagsterRunStatus.SUCCESS]))[0]
        done = [s for s in store.round_slices(run.run_id, 0) if s.status == "succeeded"]
        if len(done) != slices or len(slice_runs) != slices:
            raise RuntimeError(f"expected {slices} slices, one run each: {done}, {len(slice_runs)} runs")
        first = min(r.create_timestamp.timestamp() for r in slice_runs)
        span = max(r.end_time for r in slice_runs) - first
        train = sum(s.metrics["train_seconds"] for s in done)
        round_span = merge.end_time - first
        return {"slices": slices, "slice_samples": slice_samples,
                "slice_train_s_each": [round(s.metrics["train_seconds"], 2) for s in done],
                "slices_span_s": span, "slices_train_s": train, "overhead_ratio": span / train,
                "round_span_s": round_span, "round_ratio": round_span / train, "goal": 1.2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--slice-samples", type=int, default=1600)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "round.json")
    args = ap.parse_args()
    report("distributed round overhead", round_overhead(args.slices, args.slice_samples), args.out, console)


if __name__ == "__main__":
    main()
