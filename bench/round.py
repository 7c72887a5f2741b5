"""A distributed round's overhead on the embedded default: what a round of N simulated slices costs
beyond the slices' own training.

    .venv/bin/python bench/round.py [--slices 4] [--slice-samples 1600] [--cpu-slots 1 2] [--rounds 2]
                                    [--out bench/results/round.json]

One distributed run of ``--rounds`` rounds (round 0 also extracts the dialect's features, once per
node and dataset; later rounds are the steady state), N simulated nodes of equal calibrated speed on this machine, the real
`dagster-daemon` (warm-fork launcher, one process per run), once per ``--cpu-slots`` value, side by
side: the line's CPU "devices" (``MLOC_CPU_SLOTS``) and as many `gpu` pool slots. The slices' runs
start together and wait for a slot (with one, they train one after another; with two, two at a time
on the two cores), so their start-ups overlap the training of the others. Reported, from Dagster's
run records and the slices' own metrics:

- ``slices_span_s``: the first slice run created → the last slice run ended;
- ``slices_train_s``: the sum of the slices' own training time (first to last step, ``train_seconds``);
- ``overhead_ratio = slices_span_s / slices_train_s`` (goal ≤ 1.2);
- ``round_span_s`` and ``round_ratio``: the same up to the round's merge (``round_merge_job``) ended;
- where the rest goes: ``first_start_s`` (first slice run created → its first step), ``handoffs_s``
  (a slice's last step → the next slice's first step, where they do not overlap), ``tail_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from line_home import line_home  # noqa: E402

console = Console()


def round_overhead(slices: int, slice_samples: int, cpu_slots: int, rounds: int) -> list[dict]:
    from mloc_dagster.cli.demo import BASE_DIALECT, DEMO_DIALECTS, TARGET_DIALECT
    from mloc_dagster.core.pool.rounds import base_model_hash
    from mloc_dagster.runs.service import StartRequest, start_run

    data = {d: DEMO_DIALECTS[d] for d in (BASE_DIALECT, TARGET_DIALECT)}
    env = {"MLOC_NODE_TTL_S": "3600", "MLOC_CPU_SLOTS": str(cpu_slots)}
    with line_home(data, env=env) as (_home, instance, store):
        instance.event_log_storage.set_concurrency_slots("gpu", cpu_slots)
        run = start_run(instance, store, StartRequest(TARGET_DIALECT, jobs=rounds, candidate_every=rounds, timebox_s=600,
                        hparams={"batch_size": 16}, kind="distributed", parallelism=slices,
                        round_samples=slices * slice_samples))
        for i in range(slices):
            store.record_job_throughput(f"sim-{i}", base_model_hash(run.base_model_version), 50.0, source="calibrate")
        console.print(f"{rounds} round(s) of {slices} slices x {slice_samples} samples, {cpu_slots} slot(s), "
                      "real daemon ...")
        deadline = time.time() + 1800 * rounds
        while (job := store.get_job(run.run_id, rounds - 1)) is None or job.status != "succeeded":
            if time.time() > deadline or store.get_run(run.run_id).status in ("failed", "paused", "cancelled"):
                raise RuntimeError(f"the rounds did not finish: {store.get_run(run.run_id)}")
            time.sleep(2)
        return [one_round(instance, store, run.run_id, k, slices) | {"cpu_slots": cpu_slots,
                                                                      "slice_samples": slice_samples}
                for k in range(rounds)]


def one_round(instance, store, run_id: str, k: int, slices: int) -> dict:
    """Round ``k``'s numbers, from Dagster's run records and the slices' own metrics."""
    import dagster as dg

    tags = {"mloc/run_id": run_id, "mloc/round": str(k)}
    slice_runs = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags=tags))
    merge = instance.get_run_records(dg.RunsFilter(job_name="round_merge_job", tags=tags,
                                                   statuses=[dg.DagsterRunStatus.SUCCESS]))[0]
    done = [s for s in store.round_slices(run_id, k) if s.status == "succeeded"]
    if len(done) != slices or len(slice_runs) != slices:
        raise RuntimeError(f"round {k}: expected {slices} slices, one run each: {done}, {len(slice_runs)} runs")
    first = min(r.create_timestamp.timestamp() for r in slice_runs)
    span = max(r.end_time for r in slice_runs) - first
    train = sum(s.metrics["train_seconds"] for s in done)
    # Where the time outside training goes: the first slice's start (created → first step), the
    # hand-offs (one slice's last step → the next one's first: its dev evaluation, save and slot
    # release, the pool claim's polling, the next one's model and feature load), the tail.
    steps = sorted((s.metrics["first_step_at"], s.metrics["first_step_at"] + s.metrics["train_seconds"]) for s in done)
    return {"round": k, "slice_train_s_each": [round(s.metrics["train_seconds"], 2) for s in done],
            "slices_span_s": span, "slices_train_s": train, "overhead_ratio": span / train,
            "round_span_s": merge.end_time - first, "round_ratio": (merge.end_time - first) / train, "goal": 1.2,
            "first_start_s": steps[0][0] - first,
            "handoffs_s": [round(b[0] - a[1], 2) for a, b in zip(steps, steps[1:]) if b[0] > a[1]],
            "tail_s": max(r.end_time for r in slice_runs) - max(b for _, b in steps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--slice-samples", type=int, default=1600)
    ap.add_argument("--cpu-slots", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "round.json")
    args = ap.parse_args()
    rows = [r for n in args.cpu_slots for r in round_overhead(args.slices, args.slice_samples, n, args.rounds)]
    table = Table(title=f"distributed round overhead: {args.slices} slices x {args.slice_samples} samples")
    table.add_column("metric")
    for r in rows:
        table.add_column(f"{r['cpu_slots']} slot(s), round {r['round']}", justify="right")
    for k in [k for k in rows[0] if k not in ("cpu_slots", "round")]:
        table.add_row(k, *(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for r in rows))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
