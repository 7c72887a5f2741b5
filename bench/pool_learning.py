"""Pooled training must learn like one node: samples-to-quality of a distributed run vs a single run.

    nice -n 10 .venv/bin/python bench/pool_learning.py [--nodes 3] [--rounds 4] [--round-samples 384] \\
        [--base DIR --dataset DIR] [--merges sum,mean] [--json bench/results/pool_learning.json]

Real data, real training, CPU, no Dagster (the Ray cluster's numbers are ``bench/pool_ray.py``'s).
The same samples of the run's sample stream, the same hparams, the same total steps, side by side:

- **single**: one training run; job ``k`` trains positions ``k·n .. (k+1)·n`` of the stream,
  resumed exactly from job ``k-1`` (weights, AdamW moments, schedule) as a chained run does;
- **pooled**: ``--nodes`` nodes of equal speed; round ``k`` places the same ``n`` positions on
  them (``core.pool.placement.place``), every slice trains its range from round ``k-1``'s merged
  adapter with a fresh optimizer and no warm-up (``SliceJob``), and the round merge screens them
  against the trusted reference update and merges them on that start exactly as
  ``round_adapter`` does (``core.merging.candidates.merge_candidate``), once per ``--merges``
  rule: ``mean`` (the product's: the weighted mean of the updates), ``sum`` (the updates added
  up: the mean × the samples ÷ the mean slice size, a server learning rate of P for equal slices),
  ``gain:X`` (the mean × X) and ``post-local`` (the mean, after a first round trained on one node
  as the single run's first job: "post-local SGD", Lin et al. 2020); ``--large-batch`` adds a single
  run at P× the batch size (the same samples in 1/P of the steps, what a round's mean amounts to).

After every round/job: dev CER of the adapter (same recognizer for all), and wall time. The
single run's wall is its jobs' (training, evaluation, save); a pooled round's is its slowest
slice's (the slices run at once, each on its own node; measured here one after another) plus the
reference update and the merge with its dev evaluation. Launch overheads on a real cluster are
measured by ``bench/pool_ray.py`` and added in docs/benchmarks.md. Goals (issue 19): the pooled
dev CER within 3 % of the single run's at every equal sample count, at ≤ 1.3 / P of its wall.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.pool import prepare  # noqa: E402
from bench.report import report  # noqa: E402
from mloc_dagster.core.adapters.format import read_node_result  # noqa: E402
from mloc_dagster.core.gates.scoring import score  # noqa: E402
from mloc_dagster.core.merging.candidates import Recognizer, merge_candidate  # noqa: E402
from mloc_dagster.core.merging.screening import train_reference_update  # noqa: E402
from mloc_dagster.core.pool.placement import NodeSpeed, place  # noqa: E402
from mloc_dagster.core.training.asr import train_adapter  # noqa: E402
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec  # noqa: E402

console = Console(width=150)


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path, dataset: Path):
        self.args, self.base, self.dataset = args, base, dataset
        self.work = args.work / "runs" / f"{int(time.time())}"
        self.hparams = AdapterHParams(**{"seed": args.seed, **json.loads(args.hparams)})
        self.recognize = Recognizer(base, args.features)
        self.n = args.round_samples

    def job(self, out: Path, segments: list[tuple[int, int]], node: str, **spec) -> float:
        """Train one job/slice; its wall seconds."""
        t = time.monotonic()
        train_adapter(AdapterJobSpec(base_model_dir=self.base, dataset_version_path=self.dataset, out_dir=out,
                                     segments=segments, timebox_s=3600, checkpoint_every_s=1e9, node_id=node,
                                     feature_cache_dir=self.args.features, **spec))
        return time.monotonic() - t

    def dev_cer(self, adapter: Path | None) -> float:
        return score(self.recognize(adapter, self.dataset, split="dev")).cer

    def single(self, batch_factor: int = 1) -> list[dict]:
        """The single run; ``batch_factor`` P: at P× the batch (the same samples in 1/P the steps)."""
        hp = AdapterHParams(**{**vars(self.hparams), "batch_size": self.hparams.batch_size * batch_factor})
        rows, previous, wall = [], None, 0.0
        for k in range(self.args.rounds):
            out = self.work / f"single-x{batch_factor}" / f"job-{k}"
            wall += self.job(out, [(k * self.n, (k + 1) * self.n)], "single", resume_from=previous,
                             hparams=hp, run_id="single", job_index=k)
            previous = out
            rows.append({"round": k + 1, "samples": (k + 1) * self.n, "dev_cer": self.dev_cer(out),
                         "wall_s": wall, "steps": read_node_result(out)["total_steps"]})
            console.print(f"single job {k + 1}: {rows[-1]}")
        return rows

    def pooled(self, merge: str) -> list[dict]:
        nodes = [NodeSpeed(f"node-{j}", 1.0) for j in range(self.args.nodes)]
        slice_hp = AdapterHParams(**{**vars(self.hparams), "warmup_steps": 0})  # as SliceJob trains
        rows, start, wall, steps = [], None, 0.0, 0
        for k in range(self.args.rounds):
            out = self.work / f"pooled-{merge}" / f"round-{k}"
            if merge == "post-local" and k == 0:  # the first round trained on one node, as a single run's job
                wall += self.job(out / "node-0", [(0, self.n)], "node-0", hparams=self.hparams, run_id="post-local",
                                 job_index=0)
                start, steps = out / "node-0", read_node_result(out / "node-0")["steps"]
                rows.append({"round": 1, "samples": self.n, "dev_cer": self.dev_cer(start), "wall_s": wall,
                             "steps": steps, "update_gain": 1.0, "truncation_error": 0.0, "accepted": 1})
                continue
            slowest, dirs, samples = 0.0, [], []
            for shard in place(nodes, self.n, "dp").shards:
                d = out / shard.node_id
                segment = [(k * self.n + shard.start, k * self.n + shard.stop)]
                slowest = max(slowest, self.job(d, segment, shard.node_id, init_adapter=start, hparams=slice_hp,
                                                run_id=f"pooled-{merge}", job_index=k))
                dirs.append(str(d))
                samples.append(shard.samples)
                steps += read_node_result(d)["steps"]
            t = time.monotonic()
            ref = out / "reference"
            train_reference_update(self.base, self.dataset, ref, start_adapter=start, samples=self.args.reference_samples,
                                   hparams=slice_hp, feature_cache_dir=self.args.features)
            gain = merge_gain(merge, samples)
            result, _ = merge_candidate(dirs, samples, out / "merged", reference=ref, start_adapter=start,
                                        samples=samples, update_gain=gain)
            start = out / "merged"
            cer = self.dev_cer(start)
            wall += slowest + time.monotonic() - t
            rows.append({"round": k + 1, "samples": (k + 1) * self.n, "dev_cer": cer, "wall_s": wall, "steps": steps,
                         "update_gain": result.update_gain, "truncation_error": result.max_truncation_error,
                         "accepted": sum(r["decision"] == "accepted" for r in result.screening)})
            console.print(f"pooled ({merge}) round {k + 1}: {rows[-1]}")
        return rows


def merge_gain(merge: str, samples: list[int]) -> float:
    """``mean``, ``post-local``: 1; ``sum``: the samples ÷ the mean slice size (P for equal slices: the updates
    added up, as one node training them in a row would have moved to first order); ``gain:X``: X."""
    if merge == "sum":
        return sum(samples) / (sum(n * n for n in samples) / sum(samples))
    return float(merge.split(":", 1)[1]) if merge.startswith("gain:") else 1.0


def print_table(single: list[dict], pooled: dict[str, list[dict]]) -> None:
    table = Table(title="dev CER after equal samples (wall s)")
    for col in ("samples", "single run", *pooled):
        table.add_column(col, justify="right")
    for i, s in enumerate(single):
        cells = [f"{p[i]['dev_cer']:.4f} ({p[i]['wall_s']:.0f} s, ×{p[i]['dev_cer'] / s['dev_cer']:.3f})"
                 for p in pooled.values()]
        table.add_row(str(s["samples"]), f"{s['dev_cer']:.4f} ({s['wall_s']:.0f} s)", *cells)
    console.print(table)


def summary(args: argparse.Namespace, base_cer: float, single: list[dict], pooled: dict[str, list[dict]]) -> dict:
    results: dict = {"base dev CER": base_cer, "nodes": args.nodes}
    for i, s in enumerate(single):
        results[f"{s['samples']} samples: single run dev CER"] = s["dev_cer"]
        for merge, rows in pooled.items():
            results[f"{s['samples']} samples: {merge} dev CER"] = rows[i]["dev_cer"]
    for merge, rows in pooled.items():
        worst = max(p["dev_cer"] / s["dev_cer"] - 1 for p, s in zip(rows, single, strict=True))
        share = rows[-1]["wall_s"] / single[-1]["wall_s"]
        results[f"{merge}: worst dev CER relative to single"] = worst
        results[f"{merge}: wall / single wall (goal ≤ {1.3 / args.nodes:.3f})"] = share
        if merge.startswith("pooled"):
            results[f"{merge}: goal dev CER within 3 % at every sample count"] = worst <= 0.03
    results["single run wall s"] = round(single[-1]["wall_s"], 1)
    results["command"] = " ".join(sys.argv[1:])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--round-samples", type=int, default=384)
    ap.add_argument("--reference-samples", type=int, default=64)
    ap.add_argument("--merges", default="mean,sum,post-local",
                    help="round merges: mean (the product's), sum, gain:X, post-local (mean after a first round on one node)")
    ap.add_argument("--large-batch", action="store_true", help="also a single run at P× the batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hparams", default="{}", help="AdapterHParams overrides as JSON (both runs)")
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--dataset", type=Path, default=None, help="an en-gb-scotland dataset version directory")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=REPO / ".mloc" / "bench-pool-learning")
    ap.add_argument("--features", type=Path, default=None, help="feature cache (default <work>/features)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "pool_learning.json")
    args = ap.parse_args()
    args.features = args.features or args.work / "features"
    if unknown := {m for m in args.merges.split(",") if m not in ("sum", "mean", "post-local")
                   and not m.startswith("gain:")}:
        ap.error(f"unknown merges {sorted(unknown)}; mean, sum, post-local or gain:X")
    base, dataset = prepare(args)
    bench = Bench(args, base, dataset)
    base_cer = bench.dev_cer(None)
    console.print(f"base {base}, dataset {dataset}, base dev CER {base_cer:.4f}; work {bench.work}")
    single = bench.single()
    pooled = {f"pooled, {m}": bench.pooled(m) for m in args.merges.split(",")}
    if args.large_batch:
        pooled[f"single, batch ×{args.nodes}"] = bench.single(args.nodes)
    print_table(single, pooled)
    report("Pooled vs single learning (bench/pool_learning.py)", summary(args, base_cer, single, pooled),
           args.json, console)
    args.json.with_name(args.json.stem + "-rounds.json").write_text(
        json.dumps({"single": single, "pooled": pooled}, indent=2))


if __name__ == "__main__":
    main()
