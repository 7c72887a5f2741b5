"""Pool simulator: does screening keep a pool with a bad node as good as an all-honest one?

    nice -n 10 .venv/bin/python bench/pool.py --nodes 4 --speeds 1,1,2,4 \\
        --behaviours honest,honest,honest,shuffle --rounds 3 --seed 0 --json bench/results/pool.json \\
        [--base DIR --dataset DIR] [--round-samples 256] [--reference-samples 64] [--scale-k 5] [--unscreened]

Real data, real training, CPU, no Dagster. Nodes ``node-0 .. node-{N-1}`` have relative speeds
``--speeds`` and behaviours ``--behaviours`` (honest, shuffle, noise, scale, freeride; see
``bench/pool_nodes.py``), both cycled to N. Every round, for the pool as given and, side by side,
for the same pool with every node honest:

1. place the round's ``--round-samples`` samples (positions ``r·n .. (r+1)·n`` of the run's
   sample stream) by speed with ``core.pool.placement.place`` (dp);
2. the server trains the trusted reference update from the round's start on the root set
   (``core.merging.screening.train_reference_update``, the first ``--reference-samples`` samples);
3. every node hands in its slice's adapter, trained from the round's start (``segments``);
4. screen and merge them (``core.merging.candidates.merge_candidate`` with ``reference`` and
   ``start_adapter``; base weight = slice samples × reputation) into the next round's start;
5. dev CER of the merged adapter; reputations move by ``core.pool.reputation``'s rule;
6. round makespan (each slice's measured train time × fastest/own speed) vs the optimum for
   the measured throughput (``core.pool.placement.optimal_makespan``).

``--unscreened`` adds a third pool: the pool as given, merged without a reference (no direction
score, no dev-loss baseline: only rules 1, 2 and 5 of ``core/merging/screening.py``), to show what the
trusted reference buys. Prints a table per round and the summary through ``bench/report.py`` (table + JSON; the
per-round detail goes next to it as ``<out>-rounds.json``). Goal (issue 10): with 1 of 4 nodes
shuffling, merged dev CER within 5 % of the all-honest pool's and that node below 0.7 within 2
rounds. Without ``--base``/``--dataset`` it builds an espeak corpus and pre-trains a base first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.pool_nodes import BEHAVIOURS, TRAINS, forge, shuffled_copy  # noqa: E402
from bench.report import report  # noqa: E402
from mloc_dagster.core.adapters.format import read_node_result  # noqa: E402
from mloc_dagster.core.gates.scoring import score  # noqa: E402
from mloc_dagster.core.merging.candidates import Recognizer, load_trusted, merge_candidate  # noqa: E402
from mloc_dagster.core.merging.screening import reputation_updates, train_reference_update  # noqa: E402
from mloc_dagster.core.pool.placement import NodeSpeed, optimal_makespan, place  # noqa: E402
from mloc_dagster.core.pool.reputation import TRUST_BAR  # noqa: E402
from mloc_dagster.core.training.asr import train_adapter  # noqa: E402
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

console = Console(width=150)
DIALECT = "en-gb-scotland"


@dataclass
class Pool:
    name: str
    behaviours: list[str]
    reputation: dict[str, float]
    start: Path | None = None  # the previous round's merged adapter
    rounds: list[dict] = field(default_factory=list)
    screened: bool = True  # False: no reference (no direction score, no dev-loss baseline)


@dataclass
class Sim:
    base: Path
    dataset: Path
    shuffled: Path
    features: Path
    work: Path
    hparams: AdapterHParams
    nodes: list[str]
    speeds: list[float]
    n: int
    ref_samples: int
    k: float
    seed: int
    recognize: Recognizer
    trained: dict = field(default_factory=dict)  # (data, start, segments) -> dir: round 0 is shared

    def train(self, data: Path, start: Path | None, segments: list[tuple[int, int]], out: Path, node: str):
        key = (str(data), str(start), tuple(segments))
        if key not in self.trained:
            train_adapter(AdapterJobSpec(
                base_model_dir=self.base, dataset_version_path=data, out_dir=out, init_adapter=start,
                segments=segments, timebox_s=3600, checkpoint_every_s=1e9, hparams=self.hparams, node_id=node,
                feature_cache_dir=self.features))
            self.trained[key] = out
        return self.trained[key]

    def reference(self, start: Path | None, out: Path) -> Path:
        key = ("reference", str(start))
        if key not in self.trained:
            train_reference_update(self.base, self.dataset, out, start_adapter=start, samples=self.ref_samples,
                                   hparams=self.hparams, feature_cache_dir=self.features)
            self.trained[key] = out
        return self.trained[key]

    def dev_cer(self, adapter: Path | None) -> float:
        return score(self.recognize(adapter, self.dataset, split="dev")).cer


def hand_in(sim: Sim, pool: Pool, r: int, shards: dict, out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Every node's adapter for round ``r`` (trained slices first, then the forged ones), and the
    slices that were actually trained."""
    dirs: dict[str, Path] = {}
    for node, behaviour in zip(sim.nodes, pool.behaviours, strict=True):
        if node in shards and behaviour in TRAINS:
            s = shards[node]
            data = sim.shuffled if behaviour == "shuffle" else sim.dataset
            dirs[node] = sim.train(data, pool.start, [(r * sim.n + s.start, r * sim.n + s.stop)],
                                   out / f"{node}-trained", node)
    trained = dict(dirs)
    start = load_trusted(pool.start, "start")
    honest = [load_trusted(dirs[n], "slice") for n, b in zip(sim.nodes, pool.behaviours) if b == "honest"
              and n in dirs]
    cers = sorted(read_node_result(dirs[n])["dev_cer"] for n, b in zip(sim.nodes, pool.behaviours)
                  if b == "honest" and n in dirs)
    for j, (node, behaviour) in enumerate(zip(sim.nodes, pool.behaviours, strict=True)):
        if node not in shards or behaviour in ("honest", "shuffle"):
            continue
        own = load_trusted(dirs[node], "slice") if behaviour == "scale" else None
        cer = read_node_result(dirs[node])["dev_cer"] if behaviour == "scale" else cers[len(cers) // 2]
        dirs[node] = forge(behaviour, out / f"{node}-{behaviour}", start=start, own=own, honest=honest,
                           dev_cer=cer, node_id=node, k=sim.k, seed=sim.seed * 1000 + r * 10 + j,
                           template=honest[0].config)
    return dirs, trained


def makespan(sim: Sim, shards: dict, trained: dict[str, Path]) -> tuple[float, float]:
    """(round makespan, optimum): each trained slice's measured train time × fastest/own speed;
    the optimum for the measured throughput of this machine as the fastest node."""
    fastest = max(sim.speeds)
    speed = dict(zip(sim.nodes, sim.speeds, strict=True))
    times, samples, seconds = [], 0, 0.0
    for node, d in trained.items():
        res = read_node_result(d)
        if res.get("stop_reason") == "slice_done":
            times.append(res["train_seconds"] * fastest / speed[node])
            samples, seconds = samples + res["samples"], seconds + res["train_seconds"]
    v0 = samples / seconds if seconds else 1.0
    return max(times, default=0.0), optimal_makespan([v0 * s / fastest for s in sim.speeds], sim.n)


def run_round(sim: Sim, pool: Pool, r: int) -> dict:
    out = sim.work / pool.name / f"round-{r}"
    placement = place([NodeSpeed(n, s) for n, s in zip(sim.nodes, sim.speeds, strict=True)], sim.n, "dp")
    shards = {s.node_id: s for s in placement.shards}
    ref = sim.reference(pool.start, out / "reference") if pool.screened else None
    dirs, trained = hand_in(sim, pool, r, shards, out)
    order = [n for n in sim.nodes if n in dirs]
    weights = [shards[n].samples * pool.reputation[n] for n in order]
    merged = out / "merged"
    try:
        result, _ = merge_candidate([str(dirs[n]) for n in order], weights, merged, reference=ref,
                                    start_adapter=pool.start, node_of={str(dirs[n]): n for n in order},
                                    samples=[shards[n].samples for n in order])
        rows, pool.start = result.screening, merged
    except ValueError as exc:  # nothing accepted: the round keeps its start
        console.print(f"[red]{pool.name} round {r}: {exc}[/]")
        rows = []
    moved = reputation_updates(rows)
    for node, step in moved.items():
        pool.reputation[node] = step.apply(pool.reputation[node])
    span, best = makespan(sim, shards, trained)
    total = sum(row["weight"] for row in rows) or 1.0
    by_node = {row["node_id"]: row for row in rows}
    record = {"round": r + 1, "pool": pool.name, "dev_cer": sim.dev_cer(pool.start),
              "reference_dev_cer": read_node_result(ref, required=False).get("dev_cer"), "makespan_s": span, "optimum_s": best,
              "screened": pool.screened,
              "nodes": {n: {"behaviour": b, "samples": shards[n].samples if n in shards else 0,
                            "cosine": by_node.get(n, {}).get("cosine"), "norm": by_node.get(n, {}).get("norm"),
                            "weight": by_node.get(n, {}).get("weight", 0.0) / total,
                            "decision": by_node.get(n, {}).get("decision", "-"),
                            "clip": by_node.get(n, {}).get("clip", 1.0),
                            "dev_cer": by_node.get(n, {}).get("dev_cer"),
                            "reason": by_node.get(n, {}).get("reason", ""), "reputation": pool.reputation[n]}
                        for n, b in zip(sim.nodes, pool.behaviours, strict=True)}}
    pool.rounds.append(record)
    return record


def print_round(mixed: dict, honest: dict, unscreened: dict | None) -> None:
    plain = f", without direction/dev-loss screening {unscreened['dev_cer']:.4f}" if unscreened else ""
    table = Table(title=f"round {mixed['round']}: merged dev CER {mixed['dev_cer']:.4f} (all-honest pool "
                        f"{honest['dev_cer']:.4f}{plain}); makespan {mixed['makespan_s']:.1f} s vs optimum "
                        f"{mixed['optimum_s']:.1f} s (×{mixed['makespan_s'] / mixed['optimum_s']:.2f})")
    for col in ("node", "behaviour", "samples", "cosine", "weight", "decision", "reputation", "honest pool rep."):
        table.add_column(col, justify="right")
    for node, v in mixed["nodes"].items():
        cos = "–" if v["cosine"] is None else f"{v['cosine']:.3f}"
        decision = v["decision"] + (f", clipped ×{v['clip']:.2f}" if v["clip"] < 1 else "") + (
            f" ({v['reason'][:70]})" if v["reason"] else "")
        table.add_row(node, v["behaviour"], str(v["samples"]), cos, f"{v['weight']:.3f}", decision,
                      f"{v['reputation']:.3f}", f"{honest['nodes'][node]['reputation']:.3f}")
    console.print(table)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """A dataset version and a base model: given, or built (espeak corpus, short pre-training)."""
    from mloc_dagster.core.data.batches import find_batches
    from mloc_dagster.core.data.corpus import synth_dialect
    from mloc_dagster.core.data.datasets import build_version
    from mloc_dagster.core.models.pretrain import pretrain_base

    base, dataset = args.base, args.dataset
    if dataset is None or base is None:
        versions = {}
        for dialect, utts in (("en-us", 1200), (DIALECT, 600)):
            synth_dialect(dialect, utts, args.work / "incoming", seed=0)
            versions[dialect] = build_version(dialect, find_batches(args.work / "incoming", dialect),
                                              args.work / "datasets" / dialect).path
        dataset = dataset or versions[DIALECT]
        if base is None:
            base = args.work / "base"
            if not (base / "training.json").is_file():
                pretrain_base(versions["en-us"], base, 3600, seed=0, feature_cache_dir=args.features,
                              max_steps=args.base_steps)
    return Path(base), Path(dataset)


def summary(args: argparse.Namespace, mixed: Pool, honest: Pool, unscreened: Pool | None, wall: float) -> dict:
    results: dict = {"base dev CER": args.base_dev_cer}
    for i, (m, h) in enumerate(zip(mixed.rounds, honest.rounds, strict=True)):
        r = m["round"]
        results[f"round {r} dev CER (pool)"] = m["dev_cer"]
        results[f"round {r} dev CER (all-honest pool)"] = h["dev_cer"]
        if unscreened is not None:
            results[f"round {r} dev CER (pool, no direction/dev-loss screening)"] = unscreened.rounds[i]["dev_cer"]
        results[f"round {r} makespan / optimum"] = m["makespan_s"] / m["optimum_s"] if m["optimum_s"] else 0.0
        for node, v in m["nodes"].items():
            results[f"round {r} {node} ({v['behaviour']}) reputation / weight"] = \
                f"{v['reputation']:.3f} / {v['weight']:.3f}"
    last_m, last_h = mixed.rounds[-1]["dev_cer"], honest.rounds[-1]["dev_cer"]
    results["final dev CER relative to the all-honest pool"] = last_m / last_h - 1
    results["goal: final dev CER within 5 % of the all-honest pool"] = last_m <= 1.05 * last_h
    if unscreened is not None:
        results["final dev CER without direction/dev-loss screening, relative to all-honest"] = \
            unscreened.rounds[-1]["dev_cer"] / last_h - 1
    bad = [n for n, b in zip(mixed.rounds[0]["nodes"], mixed.behaviours, strict=True) if b != "honest"]
    for node in bad:
        below = [m["round"] for m in mixed.rounds if m["nodes"][node]["reputation"] < TRUST_BAR]
        results[f"goal: {node} ({mixed.rounds[0]['nodes'][node]['behaviour']}) below {TRUST_BAR} by round 2"] = \
            bool(below) and below[0] <= 2
    results["command"] = " ".join(sys.argv[1:])
    results["wall_seconds"] = round(wall, 1)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--speeds", default="1,1,2,4")
    ap.add_argument("--behaviours", default="honest,honest,honest,shuffle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "pool.json")
    ap.add_argument("--round-samples", type=int, default=256)
    ap.add_argument("--reference-samples", type=int, default=64)
    ap.add_argument("--scale-k", type=float, default=5.0)
    ap.add_argument("--hparams", default='{"warmup_steps": 0}', help="AdapterHParams overrides as JSON")
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--dataset", type=Path, default=None, help=f"a {DIALECT} dataset version directory")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=REPO / ".mloc" / "bench-pool")
    ap.add_argument("--features", type=Path, default=None, help="feature cache (default <work>/features)")
    ap.add_argument("--unscreened", action="store_true",
                    help="also run the pool as given without a reference (no direction score, no dev-loss check)")
    args = ap.parse_args()
    args.features = args.features or args.work / "features"
    cycle = lambda items, n: [items[i % len(items)] for i in range(n)]  # noqa: E731
    speeds = cycle([float(s) for s in args.speeds.split(",")], args.nodes)
    behaviours = cycle(args.behaviours.split(","), args.nodes)
    if unknown := sorted(set(behaviours) - set(BEHAVIOURS)):
        ap.error(f"unknown behaviours {unknown}; one of {', '.join(BEHAVIOURS)}")
    if "honest" not in behaviours:
        ap.error("at least one node must be honest (forged adapters copy an honest one's shape and norm)")

    t0 = time.time()
    base, dataset = prepare(args)
    run_dir = args.work / "runs" / f"{int(t0)}"
    nodes = [f"node-{j}" for j in range(args.nodes)]
    sim = Sim(base, dataset, shuffled_copy(dataset, args.work / "derived", args.seed, args.features), args.features,
              run_dir, AdapterHParams(**{"seed": args.seed, **json.loads(args.hparams)}), nodes, speeds,
              args.round_samples, args.reference_samples, args.scale_k, args.seed,
              Recognizer(base, args.features))
    args.base_dev_cer = sim.dev_cer(None)
    console.print(f"base {base}, dataset {dataset}, base dev CER {args.base_dev_cer:.4f}; work {run_dir}")
    mixed = Pool("pool", behaviours, dict.fromkeys(nodes, 1.0))
    honest = Pool("all-honest", ["honest"] * args.nodes, dict.fromkeys(nodes, 1.0))
    unscreened = Pool("unscreened", behaviours, dict.fromkeys(nodes, 1.0), screened=False) if args.unscreened else None
    for r in range(args.rounds):
        m, h = run_round(sim, mixed, r), run_round(sim, honest, r)
        print_round(m, h, run_round(sim, unscreened, r) if unscreened else None)
    results = summary(args, mixed, honest, unscreened, time.time() - t0)
    report("Pool simulator (bench/pool.py)", results, args.json, console)
    args.json.with_name(args.json.stem + "-rounds.json").write_text(
        json.dumps({"pool": mixed.rounds, "all_honest": honest.rounds,
                    "unscreened": unscreened.rounds if unscreened else None}, indent=2))


if __name__ == "__main__":
    main()
