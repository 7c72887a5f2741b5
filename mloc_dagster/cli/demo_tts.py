"""The demo's TTS part (issue 11): a base TTS, one short TTS run on the demo's dialect, its
candidate judged by the stop-loss, through the same daemon and training_chain_sensor as ASR runs.

It runs beside the ASR run, on the second of the demo's two CPU "devices": the base TTS (it
needs the base ASR as its aligner) pre-trains in its own process (`dagster asset materialize`)
while the ASR run trains, and the TTS run starts as soon as it is there (``advance``, called from
the demo's waits). Trimmed to fit the demo's budget (docs/tts.md has the longer measurements): the
base TTS pre-trains for TTS_BASE_S seconds on the first TTS_BASE_ROWS en-us training utterances
(their alignment by the base ASR is most of its start-up; reused from $MLOC_HOME by later demos,
like the ASR base), the run is one job of TTS_TIMEBOX_S seconds, and the gate speaks TTS_SENTENCES
test sentences with 16 Griffin-Lim iterations. A base TTS trained for minutes on CPU is not intelligible
on unseen sentences, so the candidate is expected to fail the stop-loss and the run to pause: the
demo shows the judge's numbers side by side and the reason the run paused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.table import Table

from mloc_dagster.paths import REPO, MlocPaths

TTS_BASE_S, TTS_BASE_ROWS, TTS_TIMEBOX_S, TTS_SENTENCES = 60.0, 800, 45, 12
TTS_GATE = {"sentences": TTS_SENTENCES, "gl_iterations": 16}


class TtsDemo:
    """Base TTS → one-job TTS run → its stop-loss gate, advanced step by step beside the ASR run."""

    def __init__(self, instance, store, paths: MlocPaths, dialect: str, console):
        self.instance, self.store, self.paths, self.dialect, self.console = instance, store, paths, dialect, console
        self.base_process: subprocess.Popen | None = None
        self.run = None

    def start(self) -> None:
        """Pre-train the base TTS in its own process, unless an earlier demo left one."""
        from mloc_dagster.assets.lineage import latest_metadata

        if latest_metadata(self.instance, "tts_base_model") is not None:
            return
        self.console.print(f"[cyan]tts_base_model[/]: pre-training the tiny FastSpeech2Conformer for "
                           f"{TTS_BASE_S:.0f} s on {TTS_BASE_ROWS} utterances beside the ASR run "
                           f"(log {self.paths.home / 'tts_base.log'}) ...")
        config = {"ops": {"tts_base_model": {"config": {"train_seconds": TTS_BASE_S, "train_limit": TTS_BASE_ROWS}}}}
        with open(self.paths.home / "tts_base.log", "ab") as log:
            self.base_process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "mloc_dagster.definitions",
                 "--select", "tts_base_model", "--config-json", json.dumps(config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def advance(self) -> None:
        """Start the TTS run once the base TTS is there (called from the demo's waits)."""
        if self.run is not None:
            return
        if self.base_process is not None:
            if self.base_process.poll() is None:
                return
            if self.base_process.returncode != 0:
                raise RuntimeError(f"tts_base_model failed; see {self.paths.home / 'tts_base.log'}")
        from mloc_dagster.runs.service import StartRequest, start_run

        gate_file = self.paths.home / "tts_gate.json"
        gates = json.loads(gate_file.read_text()) if gate_file.exists() else {}
        gate_file.write_text(json.dumps({**gates, self.dialect: TTS_GATE}, indent=1))
        self.run = start_run(self.instance, self.store, StartRequest(self.dialect, jobs=1, candidate_every=1,
                             timebox_s=TTS_TIMEBOX_S, track="tts"))
        self.console.print(f"[green]TTS training run[/] {self.run.run_id}: 1 job × {TTS_TIMEBOX_S} s on {self.dialect}")

    def finish(self, wait) -> list[tuple[str, str]]:
        """Wait for the TTS run's gate (and the pause it causes); returns summary rows."""
        from mloc_dagster.assets.lineage import latest_metadata

        store, dialect = self.store, self.dialect
        wait("the base TTS", lambda: self.advance() or self.run, 900)
        run = self.run

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
        base = latest_metadata(self.instance, "tts_base_model")
        return [
            ("tts_base_model", f"{base['steps']} steps, {base['samples_per_s']:.1f} samples/s, "
                               f"dev frame L1 {base['dev_frame_l1']:.3f}"),
            (f"{dialect} judge CER, real recordings", f"{f['judge_cer_real']:.3f} (judge {report['judge']['version'][:12]})"),
            (f"{dialect} judge CER, base TTS", f"{f['judge_cer_base_tts']:.3f}, MCD {f['mcd_base_tts_db']:.1f} dB"),
            (f"{dialect} judge CER, TTS candidate", f"{f['judge_cer_candidate']:.3f}, MCD {f['mcd_candidate_db']:.1f} dB"),
            ("TTS stop-loss gate", f"{candidate.gate_decision} (limit {f['max_cer']:.3f}); "
                                   f"run {store.get_run(run.run_id).status}: {store.get_run(run.run_id).status_reason or ''}"),
        ]

    def stop(self) -> None:
        if self.base_process is not None and self.base_process.poll() is None:
            self.base_process.terminate()
            self.base_process.wait(timeout=60)


def tts_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(title="TTS track")
    table.add_column("step")
    table.add_column("result")
    for row in rows:
        table.add_row(*row)
    return table
