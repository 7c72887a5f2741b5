"""The `mloc` command as a user runs it: subprocesses against a real instance and state store; the
tables of refusals run in-process (typer's CliRunner: the same command, without a dozen interpreter
start-ups that only test the entry point again)."""

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


def mloc_in_process(*args) -> tuple[int, str]:
    """The command in this process: its exit code and its output, stdout and stderr, joined as one
    line (rich wraps long lines)."""
    from typer.testing import CliRunner

    from mloc_dagster.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


def test_run_lifecycle_commands(registered_base):
    run_id = mloc("run", "start", "--dialect", "en-gb-scotland", "--jobs", "4", "--candidate-every", "2",
                  "--timebox", "30", "--hparams", '{"lr": 0.001}').stdout.strip()
    assert run_id.startswith("tr-")
    # the rest in-process: the entry point is the one `run start` just went through
    code, out = mloc_in_process("run", "status", run_id, "--json")
    status = json.loads(out)
    assert code == 0 and status["status"] == "active" and status["max_jobs"] == 4 and status["hparams"]["lr"] == 0.001
    assert status["hparams"]["rehearsal_fraction"] == 0.75  # every default pinned on the run
    assert status["dataset_version"].endswith(tuple("0123456789abcdef"))  # pinned version path

    assert "paused" in mloc_in_process("run", "pause", run_id)[1]
    assert mloc_in_process("run", "pause", run_id)[0] == 1  # already paused: a clear error
    assert "active" in mloc_in_process("run", "resume", run_id)[1]
    assert run_id in mloc_in_process("run", "list")[1]
    assert "cancelled" in mloc_in_process("run", "cancel", run_id)[1]
    assert json.loads(mloc_in_process("run", "status", run_id, "--json")[1])["status"] == "cancelled"
    assert mloc_in_process("run", "resume", run_id)[0] == 1

    # The TTS track needs its own base first, and says so.
    code, out = mloc_in_process("run", "start", "--dialect", "en-gb-scotland", "--track", "tts")
    assert code == 1 and "no tts_base_model yet" in out


def test_run_start_errors_are_clear(mloc_home):
    with dg.DagsterInstance.get():
        pass
    code, out = mloc_in_process("run", "start", "--dialect", "en-029")
    assert code == 1 and "has no dataset_version yet" in out
    code, out = mloc_in_process("run", "start", "--dialect", "en-029", "--hparams", "{nope")
    assert code != 0 and "not valid JSON" in out


TRAINING_STAGE = {"name": "adapt", "kind": "training_run", "dialect": "en-029"}
PIPELINE_REFUSALS = [
    ({**TRAINING_STAGE, "jobs": 0}, "stage adapt: jobs must be an integer >= 1, got 0"),
    ({**TRAINING_STAGE, "jobs": "six"}, "stage adapt: jobs must be an integer >= 1, got 'six'"),
    ({"name": "base", "kind": "base_model", "config": {"max_steps": "x"}},
     "stage base: config: Invalid scalar at path root:ops:base_model:config:max_steps"),
]


def test_run_start_refusals_name_the_field_and_create_nothing(mloc_home, postgres_url, monkeypatch, tmp_path):
    monkeypatch.setenv("MLOC_DATABASE_URL", postgres_url)
    with dg.DagsterInstance.get():
        pass
    refusals = [
        (["--hparams", "[1]"], "hparams must be a JSON object of name: value"),
        (["--hparams", '{"r": 0, "dropout": 1.5}'], "r must be >= 1 (got 0); dropout must be within [0, 1) (got 1.5)"),
        (["--jobs", "0"], "jobs must be an integer >= 1, got 0"),
        (["--kind", "distributed", "--parallelism", "0"], "parallelism must be an integer >= 1, got 0"),
        (["--kind", "distributed", "--parallelism", "4", "--round-samples", "3"], "round_samples must be an integer >= 4"),
        (["--first-round-on-one-node"], "--first-round-on-one-node is for a distributed run, not single"),
        (["--kind", "hyperparameter", "--trials", "0", "--space", '{"lr": [0.001, 0.01]}'],
         "trials must be an integer >= 1, got 0"),
        (["--kind", "hyperparameter", "--space", '{"r": [0, 8]}'], "r: 0 is not a valid value for the training job"),
    ]
    for args, message in refusals:
        code, out = mloc_in_process("run", "start", "--dialect", "en-029", *args)
        assert code == 1 and message in out and "Traceback" not in out, (args, out)
    for i, (stage, message) in enumerate(PIPELINE_REFUSALS):
        spec = tmp_path / f"spec{i}.json"
        spec.write_text(json.dumps({"stages": [stage]}))
        code, out = mloc_in_process("run", "start", "--kind", "pipeline", "--spec", str(spec))
        assert code == 1 and f"pipeline spec: {message}" in out and "Traceback" not in out, out
    from mloc_dagster.core.state import StateStore

    assert StateStore(postgres_url).list_runs() == []  # a refusal creates nothing


def test_warm_start_from_a_removed_candidate_is_refused(registered_base, tmp_path):
    from mloc_dagster.assets.lineage import latest_metadata
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    gone = tmp_path / ("removed-adapter-" + "x" * 120)  # longer than a terminal line: printed whole
    candidate = store.record_candidate(dialect="en-gb-scotland", adapter_path=str(gone), sha256="0" * 64, sources=[],
                                       trusted=True, base_model=latest_metadata(instance, "base_model")["version"])
    proc = mloc("run", "start", "--dialect", "en-gb-scotland", "--from", candidate.candidate_id, check=False)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1 and "Traceback" not in out + proc.stderr
    assert f"--from {candidate.candidate_id}: the adapter of {candidate.candidate_id} is gone from {gone}" in out
    assert store.list_runs() == []


def test_corpus_synth_and_dialect_commands(mloc_home):
    mloc("corpus", "synth", "--dialects", "en-029", "--utterances", "6", "--speakers", "3")
    assert (mloc_home / "incoming" / "en-029" / "synth-s0-n6" / "manifest.jsonl").is_file()
    mloc("dialect", "add", "en-029")
    assert "en-029" in mloc("dialect", "list").stdout
    assert mloc("dialect", "add", "EN_029", check=False).returncode != 0


def test_run_status_shows_a_job_whose_dev_cer_was_not_a_number(mloc_home):
    """A job that measured no dev CER (NaN, stored as null on both backends) is shown, not a crash."""
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    with StateStore(resolve_state_url()) as store:
        run_id = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m").run_id
        store.record_job_queued(run_id, 0)
        store.record_job_started(run_id, 0)
        store.record_job_finished(run_id, 0, "succeeded", checkpoint_path="/c", sha256="s",
                                  metrics={"dev_cer": float("nan"), "train_loss": 1.25})
    code, out = mloc_in_process("run", "status", run_id)
    assert code == 0 and "1.250" in out and " - " in out
