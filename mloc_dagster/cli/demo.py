"""The end-to-end demo on the embedded default (SQLite, local files), driven by the real daemon.

corpus (espeak) → incoming_batches_sensor → dataset_version per dialect → base_model →
`mloc run start` → training_chain_sensor chains the jobs → candidate → gate → promotion.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mloc_dagster.cli.demo_tts import TtsDemo, tts_table
from mloc_dagster.cli.figures import figure
from mloc_dagster.execution.daemon import DaemonProcess
from mloc_dagster.paths import MlocPaths

console = Console()

BASE_DIALECT = "en-us"
TARGET_DIALECT = "en-gb-scotland"
# 40 speakers per dialect: dev and test get >= 5 speakers and >= 150 utterances each.
DEMO_DIALECTS = {BASE_DIALECT: 2400, TARGET_DIALECT: 1200, "en-gb-x-gbclan": 1200}
# The base: 1,000 pre-training steps of 32 utterances (en-us test CER 0.084; 2,000 steps of 16
# took ~40 % longer for 0.08), batches of similar length within groups of 4 batches (a third less
# time than random batches, which are 43 % padding, for the same CER; groups of 16 cost 0.006 of
# CER), one intra-op thread (a second one gained 11 % alone and loses much more beside the other
# dialects' ingestion), built once and reused from $MLOC_HOME.
DEMO_JOBS, DEMO_TIMEBOX_S, BASE_TRAIN_S, BASE_STEPS = 3, 45, 900, 1000
BASE_RECIPE = {"batch_size": 32, "lr": 6e-3, "length_groups": 4}
# Two CPU "devices" (one intra-op thread per job): the TTS track trains beside the ASR run.
DEMO_CPU_SLOTS = 2
# The demo's gate is relative, not tuned to what the demo reaches: the candidate must make 20 %
# fewer character and word errors than the base model on the dialect's test split (absolute
# limits such as production's CER 0.15 / WER 0.20 are out of reach of a 1.2 M-parameter model
# adapted for 3 CPU-minutes), and the rest is production's defaults: P(better than the base)
# >= 0.95 over test speakers, base-dialect regression <= 5 % relative.
DEMO_GATES = {TARGET_DIALECT: {"max_cer_rel_base": 0.8, "max_wer_rel_base": 0.8, "max_base_regression_rel": 0.05,
                               "min_p_better": 0.95}}
# Against forgetting en-us: 75 % en-us rehearsal with distillation weight 3 (the defaults, 50 % and
# 1.0, learn the dialect about twice as fast per sample but cost en-us +13 ... +27 % relative;
# these keep it at +3 ... +7 %; docs/benchmarks.md, bench/learning.py).
DEMO_HPARAMS: dict = {"rehearsal_fraction": 0.75, "distill_weight": 3.0}


def _wait(what: str, check, timeout_s: float, render=None):
    """Poll ``check`` until it returns a truthy value, showing progress."""
    t0 = time.time()
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        while True:
            value = check()
            if value:
                return value
            elapsed = time.time() - t0
            if elapsed > timeout_s:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            live.update(render() if render else f"[cyan]waiting for {what}[/] {elapsed:5.0f} s")
            time.sleep(1)


def describe_thresholds(t: dict) -> str:
    parts = [f"CER ≤ {t['max_cer_rel_base']:.2f} × base model" if "max_cer_rel_base" in t else
             f"CER ≤ {t.get('max_cer', 0.15):.2f}",
             f"WER ≤ {t['max_wer_rel_base']:.2f} × base model" if "max_wer_rel_base" in t else
             f"WER ≤ {t.get('max_wer', 0.20):.2f}",
             f"P(better) ≥ {t.get('min_p_better', 0.95):.2f}",
             f"{BASE_DIALECT} regression ≤ {t.get('max_base_regression_rel', 0.05):.0%}"]
    return ", ".join(parts)


def learning_curve(jobs) -> list[tuple[str, str]]:
    """Summary rows: the run's curve, one row per job (dev CER on unseen speakers, loss, samples)."""
    rows = []
    for j in jobs:
        m = j.metrics or {}
        rows.append((f"  job {j.job_index + 1}" if rows else f"learning curve: job {j.job_index + 1}",
                     f"dev CER {figure(m.get('dev_cer'))}, train loss "
                     f"{figure(m.get('train_loss'))}, {m.get('total_samples', m.get('samples', 0)):,} samples "
                     f"seen ({j.status})"))
    return rows


def synthesize_corpus(paths: MlocPaths, utterances: int | None) -> threading.Thread:
    """The base dialect's corpus now; the others in a thread (returned), written as incoming batches."""
    from mloc_dagster.core.data.corpus import synth_dialect

    def synth(dialects):
        for dialect in dialects:
            n = utterances or DEMO_DIALECTS[dialect]
            if not (paths.incoming / dialect / f"synth-s0-n{n}" / "manifest.jsonl").exists():
                synth_dialect(dialect, n, paths.incoming, seed=0)
            console.print(f"[green]corpus[/] {dialect}: {n} espeak utterances")
    synth([BASE_DIALECT])
    others = threading.Thread(target=synth, args=([d for d in DEMO_DIALECTS if d != BASE_DIALECT],), daemon=True)
    others.start()
    return others


def print_datasets(datasets: dict[str, dict]) -> None:
    for d, md in datasets.items():
        console.print(f"[green]dataset_version[/] {d}: {md['version']} rows={md['rows']} "
                      f"train/dev/test={md['train_rows']}/{md['dev_rows']}/{md['test_rows']} "
                      f"quarantined={md['quarantined']}")


def run_demo(ui: bool = False, utterances: int | None = None, jobs: int = DEMO_JOBS, timebox_s: int = DEMO_TIMEBOX_S,
             base_seconds: float = BASE_TRAIN_S, tts: bool = True) -> int:
    # Before the definitions are imported: their GpuArbiter reads it (the daemon inherits it).
    os.environ["MLOC_CPU_SLOTS"] = str(DEMO_CPU_SLOTS)
    import dagster as dg
    from dagster import DagsterInstance

    from mloc_dagster.assets.lineage import latest_metadata
    from mloc_dagster.core.gates.gate import GateReport
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url
    from mloc_dagster.definitions import defs
    from mloc_dagster.runs.service import StartRequest, start_run

    paths = MlocPaths.from_env()
    t_start = time.time()
    console.rule("[bold]mloc_dagster demo")
    console.print(f"MLOC_HOME={paths.home}\nDAGSTER_HOME={os.environ.get('DAGSTER_HOME')}")

    with DagsterInstance.get() as instance:
        # Create every SQLite storage before the daemon starts: two processes migrating a fresh
        # storage at once race on alembic's version table.
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("dialect")
        instance.all_instigator_state()
        # The `gpu` pool gets one slot per CPU "device" (dagster instance concurrency set gpu 2).
        instance.event_log_storage.set_concurrency_slots("gpu", DEMO_CPU_SLOTS)
    daemon = DaemonProcess(paths.home / "daemon.log").start()
    console.print(f"[green]dagster-daemon[/] started (pid {daemon.pid}, log {paths.home / 'daemon.log'})")
    store = StateStore(resolve_state_url())
    tts_demo = None
    try:
        others = synthesize_corpus(paths, utterances)
        with DagsterInstance.get() as instance:
            def datasets_ready(dialects):
                mds = {d: latest_metadata(instance, "dataset_version", d) for d in dialects}
                return mds if all(mds.values()) else None
            # The base needs en-us only: it pre-trains while the other dialects are synthesized and ingested.
            datasets = _wait(f"incoming_batches_sensor → dataset_version ({BASE_DIALECT})",
                             lambda: datasets_ready([BASE_DIALECT]), 300)
            print_datasets(datasets)
            base = latest_metadata(instance, "base_model")
            if base is None:
                console.print(f"[cyan]base_model[/]: pre-training the tiny CTC model on {BASE_DIALECT} "
                              f"for {BASE_STEPS} steps of {BASE_RECIPE['batch_size']} (at most {base_seconds:.0f} s) ...")
                defs.resolve_job_def("base_model_job").execute_in_process(
                    instance=instance, run_config={"ops": {"base_model": {"config": {
                        "train_seconds": base_seconds, "max_steps": BASE_STEPS, **BASE_RECIPE}}},
                                                  "loggers": {"console": {"config": {"log_level": "INFO"}}}})
                base = latest_metadata(instance, "base_model")
            console.print(f"[green]base_model[/] {base['version']}: {base['parameters']:,} parameters, "
                          f"{BASE_DIALECT} test CER {base['test_cer']:.3f}")

            others.join()
            rest = _wait("incoming_batches_sensor → dataset_version (the other dialects)",
                         lambda: datasets_ready([d for d in DEMO_DIALECTS if d != BASE_DIALECT]), 300)
            print_datasets(rest)
            datasets.update(rest)

            # The demo's dialect always gets the demo's thresholds (a home from an older demo may
            # hold others); other dialects' entries are left as they are.
            gates_file = paths.home / "gates.json"
            gates = json.loads(gates_file.read_text()) if gates_file.exists() else {}
            gates_file.write_text(json.dumps({**gates, **DEMO_GATES}, indent=1))
            console.print(f"[green]gate thresholds[/] for {TARGET_DIALECT} ({gates_file}): "
                          f"{describe_thresholds(DEMO_GATES[TARGET_DIALECT])}")
            run = start_run(instance, store, StartRequest(TARGET_DIALECT, jobs=jobs, candidate_every=jobs, timebox_s=timebox_s,
                            hparams=DEMO_HPARAMS))
            console.print(f"[green]training run[/] {run.run_id}: {jobs} jobs × {timebox_s} s on "
                          f"{TARGET_DIALECT}, chained by training_chain_sensor; hparams {DEMO_HPARAMS}")
            if tts:
                tts_demo = TtsDemo(instance, store, paths, TARGET_DIALECT, console)
                tts_demo.start()

            def render():
                table = Table(title=f"training run {run.run_id} [{store.get_run(run.run_id).status}]")
                for col in ("job", "status", "samples", "train_loss", "dev_cer"):
                    table.add_column(col)
                for j in store.jobs_for_run(run.run_id):
                    m = j.metrics or j.progress or {}
                    table.add_row(str(j.job_index), j.status, str(m.get("samples", "")),
                                  figure(m.get("train_loss", m.get("loss"))),
                                  figure(m.get("dev_cer")))
                table.caption = f"{time.time() - t_start:.0f} s since the demo started"
                return table

            def gate_done():
                if tts_demo is not None:
                    tts_demo.advance()
                r = store.get_run(run.run_id)
                if r.status == "failed":
                    raise RuntimeError(f"training run failed: {r.status_reason}")
                mine = [c for c in store.list_candidates(TARGET_DIALECT) if c.training_run_id == run.run_id]
                if mine and mine[0].gate_decision is not None:
                    return mine[0]  # decided, passed or failed
                failed = instance.get_run_records(dg.RunsFilter(
                    job_name="candidate_job", tags={"mloc/run_id": run.run_id},
                    statuses=[dg.DagsterRunStatus.FAILURE]), limit=1)
                if failed:  # failed before the gate could decide
                    raise RuntimeError(f"candidate_job run {failed[0].dagster_run.run_id} failed; see the UI")
                return None
            candidate = _wait("the chain, the candidate and its gate", gate_done, 900, render)
            console.print(render())
            def promoted_or_refused():
                current = [store.production(TARGET_DIALECT, b) for b in ("stable", "experimental")]
                return candidate.gate_decision != "passed" or any(
                    p is not None and p.candidate_id == candidate.candidate_id for p in current)
            _wait("promotion", promoted_or_refused, 120)
            gate = latest_metadata(instance, "gate_report", TARGET_DIALECT)
            promoted = latest_metadata(instance, "production_adapter", TARGET_DIALECT)
            tts_rows = tts_demo.finish(_wait) if tts_demo is not None else []
            # Let the daemon's run workers finish writing before the daemon is stopped.
            in_flight = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
            _wait("the last runs to finish", lambda: not instance.get_run_records(
                dg.RunsFilter(statuses=in_flight), limit=1), 120)
    finally:
        if tts_demo is not None:
            tts_demo.stop()
        daemon.stop()

    summary = Table(title="mloc_dagster demo summary")
    summary.add_column("step")
    summary.add_column("result")
    for d, md in datasets.items():
        summary.add_row(f"dataset_version {d}", f"{md['rows']} rows, {md['hours']:.2f} h, {md['quarantined']} quarantined")
    summary.add_row("base_model", f"{base['parameters']:,} params; {BASE_DIALECT} test CER {base['test_cer']:.3f}")
    summary.add_row(f"{TARGET_DIALECT} CER, base model", f"{gate['cer_base_model']:.3f}")
    summary.add_row(f"{TARGET_DIALECT} CER, candidate", f"{gate['cer_candidate']:.3f} (WER {gate['wer_candidate']:.3f})")
    summary.add_row(f"{BASE_DIALECT} regression", f"{gate['base_dialect_regression_rel']:+.2%} relative")
    summary.add_row("training run", f"{jobs} jobs × {timebox_s} s on {TARGET_DIALECT}, hparams {DEMO_HPARAMS}")
    for row in learning_curve(store.jobs_for_run(run.run_id)):
        summary.add_row(*row)
    report = GateReport.from_json(Path(gate["path"]).read_text())
    summary.add_row("gate thresholds", describe_thresholds(DEMO_GATES[TARGET_DIALECT]))
    for g in report.gates:
        summary.add_row(f"  {g.name}", f"{'pass' if g.passed else 'FAIL'}: {g.description}")
    summary.add_row("gate", report.decision)
    promoted_now = promoted is not None and promoted["candidate_id"] == candidate.candidate_id
    summary.add_row("production_adapter",
                    f"{promoted['branch']} {promoted['candidate_id']}" if promoted_now else "not promoted")
    summary.add_row("wall time", f"{time.time() - t_start:.0f} s")
    console.print(summary)
    if tts_rows:
        console.print(tts_table(tts_rows))
    if not report.passed:
        console.print(f"[bold yellow]The candidate does not pass the demo's gate[/], so it was not promoted: "
                      f"{'; '.join(report.reasons)}. The demo itself completed; docs/benchmarks.md "
                      "(bench/learning.py) shows how far more training gets.")
    console.print("Open the UI: [bold]make ui[/] (dagster dev on this DAGSTER_HOME, http://127.0.0.1:3000)")
    if ui:  # dagster dev until Ctrl-C or SIGTERM, which stop it and its children within seconds
        from mloc_dagster.cli.ui import serve

        return serve()
    return 0
