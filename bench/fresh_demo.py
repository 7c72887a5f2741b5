"""How long a newcomer waits: `make demo` from a fresh clone, set-up included, phase by phase.

    .venv/bin/python bench/fresh_demo.py [--into /tmp/mloc-fresh-demo] [--out bench/results/fresh_demo.json]

Clones this checkout's HEAD into an empty directory, runs `make demo` there (set-up, then the demo
on the clone's own `.mloc`), timestamps every line of its output, and reads the phases back from
the demo's output and the Dagster run records of the clone's instance: set-up, corpus and the base
dialect's dataset, base pre-training, the ASR run (chained jobs, candidate and gate), the TTS track,
total. Run it on an idle machine: the demo's own jobs use both cores. The clone is left in place
for a look (``make ui`` there), and removed by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
console = Console()


def run_demo(into: Path) -> tuple[float, list[tuple[float, str]]]:
    """Clone HEAD into ``into`` and run `make demo`; returns (start time, timestamped lines)."""
    shutil.rmtree(into, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(into)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLOC_HOME", "MLOC_DATABASE_URL",
                                                              "VIRTUAL_ENV", "PYTHONPATH")}
    lines: list[tuple[float, str]] = []
    start = time.time()
    with subprocess.Popen(["make", "demo"], cwd=into, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            lines.append((time.time() - start, line.rstrip()))
    (into / "demo-output.txt").write_text("\n".join(f"{t:7.1f} {line}" for t, line in lines))
    if proc.returncode != 0:
        raise RuntimeError(f"make demo exited {proc.returncode}; output in {into / 'demo-output.txt'}")
    return start, lines


def first(lines: list[tuple[float, str]], text: str) -> float | None:
    return next((t for t, line in lines if text in line), None)


def run_spans(into: Path, start: float) -> dict[str, tuple[float, float]]:
    """Job name → (first created, last ended), seconds from the start, from the clone's instance."""
    code = ("import json, dagster as dg\n"
            "i = dg.DagsterInstance.get()\n"
            "print(json.dumps([[r.dagster_run.job_name, r.create_timestamp.timestamp(), r.end_time]"
            " for r in i.get_run_records()]))")
    out = subprocess.run([str(into / ".venv" / "bin" / "python"), "-c", code], cwd=into, check=True, text=True,
                         capture_output=True, env={**os.environ, "DAGSTER_HOME": str(into / ".mloc" / "dagster")})
    spans: dict[str, tuple[float, float]] = {}
    for job, created, ended in json.loads(out.stdout.strip().splitlines()[-1]):
        a, b = created - start, (ended or created) - start
        old = spans.get(job, (a, b))
        spans[job] = (min(old[0], a), max(old[1], b))
    return spans


def phases(lines: list[tuple[float, str]], spans: dict[str, tuple[float, float]]) -> dict:
    total = lines[-1][0]
    asr = [spans[j] for j in ("train_adapter_job", "candidate_job") if j in spans]
    tts = [spans[j] for j in ("__ASSET_JOB", "tts_train_adapter_job", "tts_candidate_job") if j in spans]
    return {
        "setup_s": first(lines, "[setup] ok"),
        "daemon_started_s": first(lines, "dagster-daemon started"),
        "base_dialect_corpus_s": first(lines, "corpus en-us"),
        "base_model_s": list(spans.get("base_model_job", (None, None))),
        "asr_run_s": [min(a for a, _ in asr), max(b for _, b in asr)] if asr else None,
        "tts_track_s": [min(a for a, _ in tts), max(b for _, b in tts)] if tts else None,
        "base_test_cer": next((line.split("test CER")[-1].strip(" │") for _, line in lines
                               if "base_model" in line and "test CER" in line and "│" in line), None),
        "total_s": total, "total_min": total / 60, "goal_min": 15,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--into", type=Path, default=Path("/tmp/mloc-fresh-demo"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fresh_demo.json")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True, capture_output=True).stdout
    console.print(f"fresh clone of {commit.strip()} into {args.into}; `make demo` ...")
    start, lines = run_demo(args.into)
    result = {"commit": commit.strip(), **phases(lines, run_spans(args.into, start))}
    table = Table(title="fresh `make demo` (seconds from its start)")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for k, v in result.items():
        table.add_row(k, f"{v:.1f}" if isinstance(v, float) else
                      " → ".join(f"{x:.1f}" for x in v) if isinstance(v, list) else str(v))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
