"""Placement benchmark: makespan of one round relative to the optimum.

    .venv/bin/python bench/placement.py [--pools 200] [--seed 0] [--out bench/results/placement.json]

Random heterogeneous pools: 2, 4, 8 or 16 nodes, speed spread 1:1, 1:2, 1:4 or 1:8 (the slowest
node at 20 samples/s, the fastest at spread × 20, the others log-uniform between), and rounds of
8, 64 or 512 samples per node on average. For each pool, the makespan of the greedy
(largest-remainder) placement, the exact DP and an equal split, each divided by the optimum
(``optimal_makespan``: the closed form, independent of the DP). Goals (issue 10): DP ≤ 1.01×,
greedy ≤ 1.05×. A second part gives samples unequal costs (audio durations, log-normal σ = 0.5):
there the optimum over the fixed node order is the DP itself, so greedy and equal are reported
relative to it. The last part times the DP.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import report  # noqa: E402

from mloc_dagster.core.pool.placement import METHODS, NodeSpeed, optimal_makespan, place  # noqa: E402

console = Console()
NODE_COUNTS = (2, 4, 8, 16)
SPREADS = (1, 2, 4, 8)
PER_NODE = (8, 64, 512)
SLOWEST = 20.0  # samples/s of the tiny CTC model on one CPU core, roughly


def random_pool(rng: np.random.Generator, k: int, spread: float) -> list[NodeSpeed]:
    inner = np.exp(rng.uniform(0, np.log(spread), max(k - 2, 0)))
    speeds = np.concatenate([[1.0, spread], inner])[:k] * SLOWEST
    rng.shuffle(speeds)
    return [NodeSpeed(f"node-{i}", float(s)) for i, s in enumerate(speeds)]


def ratios(pools: int, seed: int, costs: bool) -> dict[tuple[int, int, int], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in NODE_COUNTS:
        for spread in SPREADS:
            for per_node in PER_NODE:
                r = {m: [] for m in METHODS}
                for _ in range(pools):
                    nodes = random_pool(rng, k, spread)
                    n = k * per_node
                    c = rng.lognormal(0, 0.5, n) if costs else None
                    results = {m: place(nodes, n, m, costs=c).makespan_s for m in METHODS}
                    best = results["dp"] if costs else optimal_makespan([x.samples_per_s for x in nodes], n)
                    for m in METHODS:
                        r[m].append(results[m] / best)
                out[(k, spread, per_node)] = {m: np.asarray(v) for m, v in r.items()}
    return out


def summarise(grid: dict, prefix: str, results: dict) -> None:
    table = Table(title=f"makespan / optimum ({prefix})")
    for col in ("nodes", "spread", "samples/node", "dp mean", "dp max", "greedy mean", "greedy max",
                "equal mean", "equal max"):
        table.add_column(col, justify="right")
    for (k, spread, per_node), r in grid.items():
        table.add_row(str(k), f"1:{spread}", str(per_node),
                      *(f"{f(r[m]):.3f}" for m in METHODS for f in (np.mean, np.max)))
    console.print(table)
    everything = {m: np.concatenate([r[m] for r in grid.values()]) for m in METHODS}
    for m in METHODS:
        results[f"{prefix}/{m}/mean"] = float(everything[m].mean())
        results[f"{prefix}/{m}/p95"] = float(np.quantile(everything[m], 0.95))
        results[f"{prefix}/{m}/max"] = float(everything[m].max())
    for per_node in PER_NODE:
        for m in ("greedy", "equal"):
            sel = np.concatenate([r[m] for (_, _, p), r in grid.items() if p == per_node])
            results[f"{prefix}/{m}/mean@{per_node}_per_node"] = float(sel.mean())
            results[f"{prefix}/{m}/max@{per_node}_per_node"] = float(sel.max())
    for spread in SPREADS:
        sel = np.concatenate([r["equal"] for (_, s, _), r in grid.items() if s == spread])
        results[f"{prefix}/equal/mean@1:{spread}"] = float(sel.mean())


def dp_time_ms(k: int, n: int, repeats: int = 5) -> float:
    nodes = random_pool(np.random.default_rng(1), k, 8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        place(nodes, n, "dp")
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, default=200, help="random pools per (nodes, spread, round size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "placement.json")
    args = parser.parse_args()
    results: dict = {"pools_per_cell": args.pools, "cells": len(NODE_COUNTS) * len(SPREADS) * len(PER_NODE)}
    summarise(ratios(args.pools, args.seed, costs=False), "equal_cost", results)
    summarise(ratios(max(args.pools // 4, 1), args.seed + 1, costs=True), "durations", results)
    for k, n in ((16, 1_000), (16, 10_000), (16, 100_000)):
        results[f"dp_ms/{k}_nodes/{n}_samples"] = dp_time_ms(k, n)
    report("placement: makespan / optimum over all pools", results, args.out, console)


if __name__ == "__main__":
    main()
