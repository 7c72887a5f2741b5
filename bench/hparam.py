"""Hyper-parameter search with and without pruning between chained jobs: compute spent, best dev CER.

    nice -n 10 .venv/bin/python bench/hparam.py [--trials 8] [--jobs 3] [--steps-per-job 30]
        [--space '{"lr": [3e-4, 3e-2, "log"], "r": [4, 8, 16]}'] [--fixed '{"warmup_steps": 5}']
        [--pruners none,asha] [--base DIR] [--out bench/results/hparam.json]

1. corpus: espeak-ng, ``--base-utts`` en-us and ``--dialect-utts`` dialect utterances (test-sized by
   default), built into dataset versions (reused from ``--work`` when present);
2. base: the tiny CTC model pre-trained ``--base-steps`` steps on en-us (or ``--base DIR``);
3. two searches of the same space, trial budget and seed, each an Optuna study in a SQLite file
   through ``core.search.study`` exactly as the sensor will drive it: ``--pruner none`` and ``asha``
   (and ``median`` with ``--pruners none,asha,median``). A trial is a chain of ``--jobs``
   ``train_adapter`` jobs of ``--steps-per-job`` steps, each resumed from the previous job's
   checkpoint, en-us rehearsal as in production; after every job its dev CER goes to
   ``Search.report`` and a pruned trial requests no further job.

Compute is counted per job: ``wall_seconds`` of ``train_adapter`` (load, train, dev evaluation,
save: what an hourly job occupies a device for) and the process CPU time of the same call; the
goal is judged on CPU time, which, unlike wall time, does not move with the load of a shared
machine between the two searches (the job count, also reported, is load-free). Prints
per-trial tables and the comparison through ``bench/report.py``. Goal (issue 12): ≥ 2× less
compute with pruning, best dev CER within 2 % of the unpruned search's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.learning import dataset, test_rates  # noqa: E402
from bench.report import report  # noqa: E402
from mloc_dagster.core.data.features import load_features  # noqa: E402
from mloc_dagster.core.models.pretrain import pretrain_base
from mloc_dagster.core.search.study import Search, SearchConfig, parse_space, space_json  # noqa: E402
from mloc_dagster.core.training.asr import train_adapter  # noqa: E402
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

BASE_DIALECT = "en-us"
HPARAM_NAMES = [f for f in AdapterHParams.__dataclass_fields__]
console = Console()


def run_trial(search: Search, number: int, hparams: dict, ctx: dict, run_dir: Path) -> dict:
    """One trial: chained jobs until the last one or until the pruner says stop."""
    previous, curve, wall, cpu = None, [], 0.0, 0.0
    for job in range(search.config.jobs):
        out = run_dir / f"trial-{number:03d}" / f"job-{job:04d}"
        c0 = time.process_time()
        res = train_adapter(AdapterJobSpec(ctx["base"], ctx["dialect"], out, resume_from=previous, timebox_s=1e6,
                                           checkpoint_every_s=1e9, hparams=AdapterHParams(**{**ctx["fixed"], **hparams}),
                                           rehearsal_dataset_path=ctx["rehearsal"], run_id=f"{search.run_id}-{number}",
                                           job_index=job, feature_cache_dir=ctx["cache"], max_steps=ctx["steps"]))
        cpu += time.process_time() - c0
        wall += res.wall_seconds
        curve.append(res.dev_cer)
        previous = out
        if search.report(number, job, res.dev_cer):
            break
    else:
        search.finish(number, curve[-1])
    return {"wall_s": wall, "cpu_s": cpu, "jobs": len(curve)}


def run_search(pruner: str, args: argparse.Namespace, ctx: dict, stamp: int) -> dict:
    url = f"sqlite:///{args.work / 'search.db'}"
    config = SearchConfig(space=space_json(parse_space(args.space, HPARAM_NAMES)), trials=args.trials, jobs=args.jobs,
                          seed=args.seed, pruner=pruner, reduction_factor=args.reduction_factor)
    search = Search.create(url, f"bench-{stamp}-{pruner}", config)
    costs = {}
    while search.open_slots():
        number, hparams = search.ask()
        costs[number] = run_trial(search, number, hparams, ctx, args.work / "runs" / search.run_id)
        row = next(t for t in search.summary() if t.trial == number)
        console.print(f"[{pruner}] trial {number} {hparams}: dev CER per job "
                      f"{', '.join(f'{c:.3f}' for c in row.dev_cer_per_job)} → {row.state} ({costs[number]['wall_s']:.0f} s)")
    return summarize(search, costs, ctx)


def summarize(search: Search, costs: dict, ctx: dict) -> dict:
    rows = search.summary()
    table = Table(title=f"search {search.run_id}: pruner {search.config.pruner}")
    for col in ("trial", "hparams", "dev CER per job", "state", "wall s"):
        table.add_column(col, justify="right")
    for t in rows:
        table.add_row(str(t.trial), json.dumps(t.hparams), ", ".join(f"{c:.3f}" for c in t.dev_cer_per_job),
                      t.state + (f" after job {t.pruned_at_job + 1}" if t.pruned_at_job is not None else ""),
                      f"{costs[t.trial]['wall_s']:.1f}")
    console.print(table)
    number, hparams, cer = search.best()
    best_dir = ctx["work"] / "runs" / search.run_id / f"trial-{number:03d}" / f"job-{search.config.jobs - 1:04d}"
    return {"wall_s": sum(c["wall_s"] for c in costs.values()), "cpu_s": sum(c["cpu_s"] for c in costs.values()),
            "jobs": sum(c["jobs"] for c in costs.values()), "best_trial": number, "best_hparams": hparams,
            "best_dev_cer": cer, "best_test_cer": test_rates(ctx["base"], best_dir, ctx["dialect"], ctx["cache"])["cer"],
            "pruned": {t.trial: t.pruned_at_job + 1 for t in rows if t.state == "pruned"},
            "trials": [t.to_dict() for t in rows]}


def prepare(args: argparse.Namespace) -> dict:
    cache = args.work / "features"
    versions = {BASE_DIALECT: dataset(args.work, BASE_DIALECT, args.base_utts),
                args.dialect: dataset(args.work, args.dialect, args.dialect_utts)}
    base = args.base or args.work / "base"
    if not (base / "training.json").is_file():
        console.print(f"pre-training the base model on {BASE_DIALECT}: {args.base_steps} steps ...")
        pretrain_base(versions[BASE_DIALECT], base, 3600, seed=0, feature_cache_dir=cache, max_steps=args.base_steps)
    for v in versions.values():  # warm the feature cache: a trial's first job should train, not extract
        for split in ("train", "dev", "test"):
            load_features(v, split, cache_dir=cache)
    return {"work": args.work, "base": base, "dialect": versions[args.dialect], "rehearsal": versions[BASE_DIALECT],
            "cache": cache, "steps": args.steps_per_job, "fixed": json.loads(args.fixed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".mloc" / "bench-hparam")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hparam.json")
    ap.add_argument("--dialect", default="en-gb-scotland")
    ap.add_argument("--base-utts", type=int, default=300)
    ap.add_argument("--dialect-utts", type=int, default=200)
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--base", type=Path, default=None, help="reuse this base model directory")
    ap.add_argument("--space", default='{"lr": [3e-4, 3e-2, "log"], "r": [4, 8, 16]}')
    ap.add_argument("--fixed", default='{"warmup_steps": 5}',
                    help="hparams every trial shares (JSON); a short warm-up, as in an hour-long job")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=3, help="jobs per trial (one job = one unit of resource)")
    ap.add_argument("--steps-per-job", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--pruners", default="none,asha")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t_start = time.time()
    ctx = prepare(args)
    found = {p: run_search(p, args, ctx, int(t_start)) for p in args.pruners.split(",")}
    ref = found[args.pruners.split(",")[0]]
    results: dict = {"space": args.space, "fixed hparams": args.fixed,
                     "trials x jobs x steps": f"{args.trials} x {args.jobs} x {args.steps_per_job}"}
    for p, r in found.items():
        results.update({f"{p}: jobs run": r["jobs"], f"{p}: compute s (jobs' wall)": round(r["wall_s"], 1),
                        f"{p}: CPU s (process)": round(r["cpu_s"], 1), f"{p}: best dev CER": r["best_dev_cer"],
                        f"{p}: best test CER": r["best_test_cer"], f"{p}: best hparams": json.dumps(r["best_hparams"]),
                        f"{p}: pruned (trial: after job)": json.dumps(r["pruned"])})
        if r is not ref:
            # CPU time and job count do not move with the load of a shared machine; wall time does.
            saving, loss = ref["cpu_s"] / r["cpu_s"], r["best_dev_cer"] / ref["best_dev_cer"] - 1
            results[f"{p}: compute saving × (CPU s)"] = round(saving, 2)
            results[f"{p}: compute saving × (jobs' wall s)"] = round(ref["wall_s"] / r["wall_s"], 2)
            results[f"{p}: compute saving × (jobs)"] = round(ref["jobs"] / r["jobs"], 2)
            results[f"{p}: best dev CER vs unpruned"] = f"{loss:+.1%}"
            results[f"{p}: goal ≥ 2× less CPU, best dev CER within 2 %"] = saving >= 2 and loss <= 0.02
    results["wall_seconds"] = round(time.time() - t_start, 1)
    report("Hyper-parameter search with and without pruning (bench/hparam.py)", results, args.out, console)
    args.out.with_name(args.out.stem + "-trials.json").write_text(json.dumps(found, indent=2, default=str))


if __name__ == "__main__":
    main()
