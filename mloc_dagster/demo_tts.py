"""The demo's TTS part (issue 11): a base TTS, one short TTS run on the demo's dialect, its
candidate judged by the stop-loss, through the same daemon and training_chain_sensor as ASR runs.

Trimmed to fit the demo's budget (docs/tts.md has the longer measurements): the base TTS
pre-trains for TTS_BASE_S seconds (reused from $MLOC_HOME by later demos, like the ASR base), the
run is one job of TTS_TIMEBOX_S seconds, and the gate speaks TTS_SENTENCES test sentences with 16
Griffin-Lim iterations. A base TTS trained for minutes on CPU is not intelligible on unseen
sentences, so the candidate is expected to fail the stop-loss and the run to pause: the demo shows
the judge's numbers side by side and the reason the run paused.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from mloc_dagster.paths import MlocPaths

TTS_BASE_S, TTS_TIMEBOX_S, TTS_SENTENCES = 240.0, 60, 12
TTS_GATE = {"sentences": TTS_SENTENCES, "gl_iterations": 16}


def run_tts_demo(instance, store, paths: MlocPaths, dialect: str, wait, console) -> list[tuple[str, str]]:
    """Base TTS (if none yet), a one-job TTS run, its gate; returns summary rows."""
    from mloc_dagster.assets.lineage import latest_metadata
    from mloc_dagster.definitions import defs
    from mloc_dagster.training_runs import start_run

    base = latest_metadata(instance, "tts_base_model")
    if base is None:
        console.print(f"[cyan]tts_base_model[/]: pre-training the tiny FastSpeech2Conformer for {TTS_BASE_S:.0f} s ...")
        defs.resolve_job_def("tts_base_model_job").execute_in_process(
            instance=instance, run_config={"ops": {"tts_base_model": {"config": {"train_seconds": TTS_BASE_S}}},
                                           "loggers": {"console": {"config": {"log_level": "INFO"}}}})
        base = latest_metadata(instance, "tts_base_model")
    console.print(f"[green]tts_base_model[/] {base['version'][:12]}: {base['steps']} steps, "
                  f"{base['samples_per_s']:.1f} samples/s, dev frame L1 {base['dev_frame_l1']:.3f}")
    gate_file = paths.home / "tts_gate.json"
    gates = json.loads(gate_file.read_text()) if gate_file.exists() else {}
    gate_file.write_text(json.dumps({**gates, dialect: TTS_GATE}, indent=1))
    run = start_run(instance, store, dialect, jobs=1, candidate_every=1, timebox_s=TTS_TIMEBOX_S, track="tts")
    console.print(f"[green]TTS training run[/] {run.run_id}: 1 job × {TTS_TIMEBOX_S} s on {dialect}")

    def gated():
        mine = store.list_candidates(dialect, training_run_id=run.run_id)
        if store.get_run(run.run_id).status == "failed":
            raise RuntimeError(f"TTS run failed: {store.get_run(run.run_id).status_reason}")
        return mine[0] if mine and mine[0].gate_decision else None
    candidate = wait("the TTS job, its candidate and the stop-loss gate", gated, 900)
    report = json.loads(Path(candidate.gate_report_path).read_text())
    f = report["figures"]
    if candidate.gate_decision == "failed":  # the chain pauses the run on its next tick
        wait("the stop-loss pause", lambda: store.get_run(run.run_id).status != "active", 60)
    return [
        ("tts_base_model", f"{base['steps']} steps, {base['samples_per_s']:.1f} samples/s"),
        (f"{dialect} judge CER, real recordings", f"{f['judge_cer_real']:.3f} (judge {report['judge']['version'][:12]})"),
        (f"{dialect} judge CER, base TTS", f"{f['judge_cer_base_tts']:.3f}, MCD {f['mcd_base_tts_db']:.1f} dB"),
        (f"{dialect} judge CER, TTS candidate", f"{f['judge_cer_candidate']:.3f}, MCD {f['mcd_candidate_db']:.1f} dB"),
        ("TTS stop-loss gate", f"{candidate.gate_decision} (limit {f['max_cer']:.3f}); "
                               f"run {store.get_run(run.run_id).status}: {store.get_run(run.run_id).status_reason or ''}"),
    ]


def tts_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(title="TTS track")
    table.add_column("step")
    table.add_column("result")
    for row in rows:
        table.add_row(*row)
    return table
