"""The `mloc` command as a user runs it: subprocesses against a real instance and state store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

MLOC = str(Path(sys.executable).parent / "mloc")


def mloc(*args, check=True):
    proc = subprocess.run([MLOC, *args], env=os.environ.copy(), capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_run_lifecycle_commands(registered_base):
    run_id = mloc("run", "start", "--dialect", "en-gb-scotland", "--jobs", "4", "--candidate-every", "2",
                  "--timebox", "30", "--hparams", '{"lr": 0.001}').stdout.strip()
    assert run_id.startswith("tr-")
    status = json.loads(mloc("run", "status", run_id, "--json").stdout)
    assert status["status"] == "active" and status["max_jobs"] == 4 and status["hparams"]["lr"] == 0.001
    assert status["hparams"]["rehearsal_fraction"] == 0.75  # every default pinned on the run
    assert status["dataset_version"].endswith(tuple("0123456789abcdef"))  # pinned version path

    assert "paused" in mloc("run", "pause", run_id).stdout
    assert mloc("run", "pause", run_id, check=False).returncode == 1  # already paused: a clear error
    assert "active" in mloc("run", "resume", run_id).stdout
    assert run_id in mloc("run", "list").stdout
    out = mloc("run", "cancel", run_id).stdout
    assert "cancelled" in out
    assert json.loads(mloc("run", "status", run_id, "--json").stdout)["status"] == "cancelled"
    assert mloc("run", "resume", run_id, check=False).returncode == 1

    # The TTS track needs its own base first, and says so.
    proc = mloc("run", "start", "--dialect", "en-gb-scotland", "--track", "tts", check=False)
    assert proc.returncode == 1 and "no tts_base_model yet" in proc.stdout


def test_run_start_errors_are_clear(mloc_home):
    with dg.DagsterInstance.get():
        pass
    proc = mloc("run", "start", "--dialect", "en-029", check=False)
    assert proc.returncode == 1 and "has no dataset_version yet" in proc.stdout
    proc = mloc("run", "start", "--dialect", "en-029", "--hparams", "{nope", check=False)
    assert proc.returncode != 0 and "not valid JSON" in proc.stdout + proc.stderr


def test_corpus_synth_and_dialect_commands(mloc_home):
    mloc("corpus", "synth", "--dialects", "en-029", "--utterances", "6", "--speakers", "3")
    assert (mloc_home / "incoming" / "en-029" / "synth-s0-n6" / "manifest.jsonl").is_file()
    mloc("dialect", "add", "en-029")
    assert "en-029" in mloc("dialect", "list").stdout
    assert mloc("dialect", "add", "EN_029", check=False).returncode != 0
