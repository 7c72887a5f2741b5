"""`mloc run ...`: training runs, which Dagster has no verb for."""

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mloc_dagster.cli.figures import figure
from mloc_dagster.cli.replay import replay_command

run_app = typer.Typer(no_args_is_help=True, help="Training runs: start, pause, resume, cancel, status, list.")
run_app.command("replay")(replay_command)
console = Console()


def _context():
    from dagster import DagsterInstance

    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    return DagsterInstance.get(), StateStore(resolve_state_url())


@run_app.command("start")
def start(dialect: str = typer.Option(None, "--dialect", help="Required except for --kind pipeline."),
          jobs: int = typer.Option(6, "--jobs"),
          candidate_every: int = typer.Option(6, "--candidate-every", min=1, max=12),
          timebox: int = typer.Option(3600, "--timebox", help="Seconds per job."),
          hparams: str = typer.Option("{}", "--hparams",
                                      help='JSON, e.g. {"lr": 0.002, "r": 8, "target_modules": ["head"]}'),
          init_from: str = typer.Option(None, "--from", help="Warm start from an adapter of the dialect: "
                                        "production, production:experimental or a candidate id."),
          kind: str = typer.Option("single", "--kind", help="single (one job at a time), distributed "
                                   "(--jobs rounds, each placed as slices on the pool's nodes and merged) or "
                                   "hyperparameter (--trials runs of --jobs jobs, pruned between jobs)."),
          space: str = typer.Option(None, "--space", help='hyperparameter: JSON, e.g. '
                                    '{"lr": [1e-4, 1e-2, "log"], "r": [4, 8, 16]}'),
          trials: int = typer.Option(8, "--trials", help="hyperparameter: trials in total."),
          spec: Path = typer.Option(None, "--spec", help="pipeline: a JSON/YAML file of stages (docs/pipelines.md)."),
          parallelism: int = typer.Option(4, "--parallelism", help="distributed: slices per round, at most; "
                                          "hyperparameter: trials at once."),
          round_samples: int = typer.Option(0, "--round-samples",
                                            help="distributed: samples per round (default 256 per slice)."),
          first_round_on_one_node: bool = typer.Option(
              False, "--first-round-on-one-node", help="distributed: train round 0 on the fastest node, then pool "
              "(learns like a single run from the first round on; docs/distributed.md)."),
          track: str = typer.Option("asr", "--track", help="asr (speech recognition adapters) or tts (speech "
                                    "synthesis adapters on the base TTS, gated by the stop-loss).")) -> None:
    """Start a training run; prints its id. The training_chain_sensor launches the jobs."""
    from mloc_dagster.runs.service import StartRequest, TrainingRunError, start_run

    try:
        parsed = json.loads(hparams)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--hparams is not valid JSON: {exc}") from exc
    instance, store = _context()
    if kind == "pipeline" or spec is not None:
        from mloc_dagster.definitions import defs
        from mloc_dagster.runs.service import start_pipeline

        try:
            print(start_pipeline(instance, store, spec if spec is not None else {}, defs.resolve_job_def).run_id)
        except TrainingRunError as exc:
            console.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from exc
        return
    if not dialect:
        console.print("[red]error:[/] --dialect is required", soft_wrap=True)
        raise typer.Exit(1)
    try:
        run = start_run(instance, store, StartRequest(
            dialect, jobs=jobs, candidate_every=candidate_every, timebox_s=timebox, hparams=parsed, init_from=init_from,
            kind=kind, parallelism=parallelism, round_samples=round_samples or 256 * parallelism,
            first_round_on_one_node=first_round_on_one_node, space=space,
            trials=trials, track=track))
    except (TrainingRunError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    print(run.run_id)


def _transition(run_id: str, fn, verb: str) -> None:
    _, store = _context()
    if store.get_run(run_id) is None:
        console.print(f"[red]error:[/] no training run {run_id}", soft_wrap=True)
        raise typer.Exit(1)
    if not fn(store, run_id):
        console.print(f"[red]error:[/] cannot {verb} {run_id}: it is {store.get_run(run_id).status}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{run_id}: {store.get_run(run_id).status}")


@run_app.command("pause")
def pause(run_id: str) -> None:
    """Stop the chain after the job in flight."""
    from mloc_dagster.runs.service import pause_run

    _transition(run_id, pause_run, "pause")


@run_app.command("resume")
def resume(run_id: str) -> None:
    """Continue from the last checkpoint."""
    from mloc_dagster.runs.service import resume_run

    _transition(run_id, resume_run, "resume")


@run_app.command("cancel")
def cancel(run_id: str) -> None:
    """Cancel the run and terminate its job in flight."""
    from mloc_dagster.runs.service import cancel_run

    instance, store = _context()
    run = store.get_run(run_id)
    if run is None or run.is_terminal:
        console.print(f"[red]error:[/] {run_id} is {'unknown' if run is None else run.status}", soft_wrap=True)
        raise typer.Exit(1)
    terminated = cancel_run(instance, store, run_id)
    console.print(f"{run_id}: cancelled; terminated Dagster runs: {', '.join(terminated) or 'none'}")


def _run_dict(store, run, instance=None) -> dict:
    d = asdict(run)
    if instance is not None:
        from mloc_dagster.runs.lifecycle import lifecycle

        d["lifecycle"] = lifecycle(instance, run)
    d["jobs"] = [{k: v for k, v in asdict(j).items() if k in ("job_index", "status", "dagster_run_id", "node_id",
                                                              "checkpoint_path", "metrics", "progress", "error",
                                                              "attempts")}
                 for j in store.jobs_for_run(run.run_id)]
    if run.distributed:
        d["rounds"] = {str(k): [{"slice": s.slice_index, "node": s.node_id, "samples": s.samples,
                                 "expected_s": round(s.expected_s, 1), "status": s.status, "outcome": s.outcome}
                                for s in store.round_slices(run.run_id, k)]
                       for k in range(run.max_jobs) if store.round_slices(run.run_id, k)}
    if run.kind == "hyperparameter":
        from mloc_dagster.core.search.study import Search

        runs = {t.trial_number: t for t in store.list_runs(parent_run_id=run.run_id, limit=None)}
        d["trials"] = [{**t.to_dict(), "run_id": runs[t.trial].run_id if t.trial in runs else None,
                        "run_status": runs[t.trial].status if t.trial in runs else None}
                       for t in Search.open(store.url, run.run_id).summary()]
    return json.loads(json.dumps(d, default=str))


@run_app.command("status")
def status(run_id: str = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """One run in detail (or every live run)."""
    instance, store = _context()
    runs = [store.get_run(run_id)] if run_id else store.list_runs(status=("active", "paused"))
    if run_id and runs[0] is None:
        console.print(f"[red]error:[/] no training run {run_id}", soft_wrap=True)
        raise typer.Exit(1)
    data = [_run_dict(store, r, instance) for r in runs]
    if as_json:
        print(json.dumps(data[0] if run_id else data, indent=2))
        return
    for d in data:
        life = d["lifecycle"]
        table = Table(title=f"{d['run_id']} {d['dialect']} {d['track']} {d['kind']} [{life['state']}, {life['retries']} retries] "
                            f"{d['status_reason'] or ''}")
        dev = "dev_frame_l1" if d["track"] == "tts" else "dev_cer"
        for col in ("job", "status", "dagster run", "node", "progress", dev, "train_loss", "error"):
            table.add_column(col)
        for j in d["jobs"]:
            m, p = j["metrics"] or {}, j["progress"] or {}
            live = f"step {p.get('step')} · {p.get('samples')} samples · ETA {p.get('eta_s', 0):.0f} s" \
                if j["status"] == "running" and p else ""
            table.add_row(str(j["job_index"]), j["status"], (j["dagster_run_id"] or "")[:8], j["node_id"] or "", live,
                          figure(m.get(dev)), figure(m.get("train_loss")),
                          (j["error"] or "")[:60])
        console.print(table)
        if d.get("trials"):
            trials = Table(title="trials")
            for col in ("trial", "run", "state", "hparams", "dev CER per job", "why"):
                trials.add_column(col)
            for t in d["trials"]:
                trials.add_row(str(t["trial"]), t["run_id"] or "", t["state"], json.dumps(t["hparams"]),
                               " ".join(figure(x) for x in t["dev_cer_per_job"]), (t["reason"] or "")[:60])
            console.print(trials)
        for k, slices in (d.get("rounds") or {}).items():
            rounds = Table(title=f"round {k}")
            for col in ("slice", "node", "samples", "expected_s", "status", "outcome"):
                rounds.add_column(col)
            for x in slices:
                rounds.add_row(str(x["slice"]), x["node"], str(x["samples"]), str(x["expected_s"]), x["status"],
                               (x["outcome"] or "")[:70])
            console.print(rounds)


@run_app.command("list")
def list_runs(limit: int = typer.Option(50)) -> None:
    """Training runs, newest first."""
    _, store = _context()
    table = Table()
    for col in ("run_id", "dialect", "track", "status", "jobs done", "max jobs", "K", "timebox_s", "created"):
        table.add_column(col, no_wrap=col in ("run_id", "dialect", "status"))
    for r in store.list_runs(limit=limit):
        done = 0 if r.last_finished_job is None else r.last_finished_job + 1
        table.add_row(r.run_id, r.dialect, r.track, r.status, str(done), str(r.max_jobs), str(r.candidate_every),
                      str(r.timebox_s), r.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)


@run_app.command("logs")
def logs(run_id: str, tail: int = typer.Option(20, "--tail", help="Lines to show (0: all).")) -> None:
    """The last log lines of the run's newest Dagster run (its job in flight, or the last one)."""
    from mloc_dagster.runs.lifecycle import latest_dagster_run, log_tail

    instance, store = _context()
    if store.get_run(run_id) is None:
        console.print(f"[red]error:[/] no training run {run_id}", soft_wrap=True)
        raise typer.Exit(1)
    latest = latest_dagster_run(instance, run_id)
    if latest is None:
        console.print(f"{run_id}: no Dagster run yet (the sensor requests the first job on its next tick)")
        return
    console.print(f"[bold]{latest.job_name}[/] {latest.run_id} ({latest.status.value})")
    for line in log_tail(instance, latest.run_id, tail):
        print(line)
