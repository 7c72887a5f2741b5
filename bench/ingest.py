"""Ingest benchmark: throughput, incremental cost and memory growth of dataset_version builds.

    .venv/bin/python bench/ingest.py [--scale 300] [--out bench/results/ingest.json]

1. audio-hours ingested per CPU-minute (full build of the 10x corpus);
2. full build vs +1 % incremental build (wall and CPU time ratio), over 100 batches;
3. peak RSS of a build at 1x and 10x data in one batch (ratio; streaming shards keep it flat).
Each build runs in a fresh subprocess so CPU time and peak RSS are its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import report  # noqa: E402

from mloc_dagster.core.data.corpus import synth_dialect  # noqa: E402

DIALECT = "en-gb-scotland"

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
from mloc_dagster.core.data.batches import find_batches
from mloc_dagster.core.data.datasets import build_version
home = Path(sys.argv[1])
t0, c0 = time.perf_counter(), os.times()
r = build_version(sys.argv[2], find_batches(home / "incoming", sys.argv[2]), home / "datasets" / sys.argv[2])
c1 = os.times()
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
                  "rows": r.rows, "hours": r.manifest["seconds"] / 3600, "built": r.built_batches,
                  "reused": r.reused_batches, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(home: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(home), DIALECT], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    code = "import resource, mloc_dagster.core.data.datasets; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    return float(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                                text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=300, help="utterances at 1x")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mloc-bench-ingest-"))
    console = Console()
    try:
        # memory: 1x and 10x in a single batch
        src = work / "src"
        console.print(f"synthesizing {args.scale} and {10 * args.scale} utterances ...")
        synth_dialect(DIALECT, args.scale, src / "x1" / "incoming", seed=1, batch_id="big")
        synth_dialect(DIALECT, 10 * args.scale, src / "x10" / "incoming", seed=1, batch_id="big")
        x1, x10 = build(src / "x1"), build(src / "x10")

        # incremental: 100 batches, then one more of 1 %
        inc = work / "inc"
        per = max(1, 10 * args.scale // 100)
        for i in range(100):
            synth_dialect(DIALECT, per, inc / "incoming", seed=100 + i, batch_id=f"b{i:03d}")
        full = build(inc)
        synth_dialect(DIALECT, per, inc / "incoming", seed=999, batch_id="b100")
        plus1 = build(inc)
        base_rss = baseline_rss()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "audio_hours_per_cpu_minute": x10["hours"] / (x10["cpu_s"] / 60),
        "rows_1x": x1["rows"], "rows_10x": x10["rows"], "hours_10x": x10["hours"],
        "peak_rss_mb_1x": x1["peak_rss_mb"], "peak_rss_mb_10x": x10["peak_rss_mb"],
        "peak_rss_ratio_10x_vs_1x": x10["peak_rss_mb"] / x1["peak_rss_mb"],
        "import_baseline_rss_mb": base_rss,
        "full_build_wall_s": full["wall_s"], "full_build_cpu_s": full["cpu_s"],
        "incremental_wall_s": plus1["wall_s"], "incremental_cpu_s": plus1["cpu_s"],
        "incremental_vs_full_wall_ratio": plus1["wall_s"] / full["wall_s"],
        "incremental_vs_full_cpu_ratio": plus1["cpu_s"] / full["cpu_s"],
        "incremental_batches_built": plus1["built"], "incremental_batches_reused": plus1["reused"],
    }
    report("dataset_version ingest", results, args.out, console)


if __name__ == "__main__":
    main()
