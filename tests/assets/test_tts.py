"""The TTS track through Dagster, on the shared line (real espeak audio, a 150-step base ASR as
aligner and judge): tts_base_model, TTS training runs chained by the real training_chain_sensor,
TTS candidates gated by the stop-loss, promotion per track, and a stop-loss that pauses the run.

Speech a judge can read in minutes of CPU needs a TTS base that memorised a few utterances
(docs/tts.md): 8 en-us training utterances, no dropout, 600 steps; the gate speaks those 8
sentences. The working adapter trains 10 gentle steps on them; the broken one trains 60 steps on
the same recordings paired with each other's texts (``shuffle_texts``: mislabelled data), which
the judge hears as junk. Measured with a 2,000-step judge while writing this test: floor 0.03,
base TTS 0.44, working 0.44 (collapse 0.5), broken 0.86 (collapse 1.0).
"""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from mloc_dagster.assets.tracks import TRACKS
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.service import StartRequest, TrainingRunError, cancel_run, resume_run, start_run
from tests.sensors.conftest import tick

pytestmark = pytest.mark.slow  # a TTS base, two TTS runs, four syntheses of 8 sentences: ~5 min

DIALECT = "en-us"
ROWS = 8
TTS_CANDIDATE_JOB = TRACKS["tts"].candidate_job
MEMORISING_BASE = {"train_limit": ROWS, "max_steps": 600, "train_seconds": 900, "lr": 3e-3, "batch_size": ROWS,
                   "warmup_steps": 10, "schedule": "constant", "dropout": 0.0}
WORKING = {"max_steps": 10, "lr": 1e-3, "train_limit": ROWS, "batch_size": ROWS}
BROKEN = {"max_steps": 60, "lr": 3e-3, "train_limit": ROWS, "batch_size": ROWS, "shuffle_texts": True}
# Calibrated on this judge (a 150-step ASR: floor 0.20, base TTS and working candidate 0.56 with 7
# of 8 sentences above CER 0.5, broken 0.8+ with all 8): the limits sit between working and broken.
GATE = {"split": "train", "sentences": ROWS, "gl_iterations": 16, "max_cer_over_floor": 0.45,
        "max_collapse_share": 0.9}


def execute(instance, request):
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags,
                                  partition_key=request.partition_key, raise_on_error=False)


def drive(instance, store, ticks: int, cursor=None):
    """Tick the real sensor and execute what it requests; returns the executed job names."""
    ran = []
    for _ in range(ticks):
        result, cursor = tick(instance, store, cursor)
        for request in result.run_requests:
            ran.append((request.job_name, execute(instance, request).success))
    return ran, cursor


@pytest.fixture()
def tts_line(line_instance, mloc_home):
    instance = line_instance
    result = defs.resolve_job_def("tts_base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"tts_base_model": {"config": MEMORISING_BASE}}})
    assert result.success
    (mloc_home / "tts_gate.json").write_text(json.dumps({DIALECT: GATE}))
    return instance, StateStore(resolve_state_url())


def test_tts_runs_are_gated_by_the_stop_loss_and_a_failure_pauses_the_run(tts_line, mloc_home):
    instance, store = tts_line
    base = instance.get_latest_materialization_event(dg.AssetKey("tts_base_model")).asset_materialization.metadata
    assert base["aligner"].value and base["steps"].value == 600

    # A working TTS run: one job, its candidate passes both gates and is promoted on the tts track.
    run = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                                                  hparams=WORKING, track="tts"))
    assert run.track == "tts" and run.base_model_version == base["path"].value and run.rehearsal_dataset == ""
    ran, _ = drive(instance, store, ticks=3)
    assert ran == [("tts_train_adapter_job", True), (TTS_CANDIDATE_JOB, True)], ran
    good = store.list_candidates(DIALECT, training_run_id=run.run_id)[0]
    assert good.track == "tts" and good.gate_decision == "passed", good
    report = json.loads(open(good.gate_report_path).read())
    f = report["figures"]
    print("working:", {k: round(v, 3) for k, v in f.items()})
    assert f["judge_cer_real"] < f["judge_cer_candidate"] <= f["max_cer"]
    assert report["judge"]["version"] == base["aligner"].value  # the pinned judge, named in the report
    assert all(open(s["candidate"], "rb").read(4) == b"RIFF" for s in report["samples"])
    assert store.production(DIALECT, "stable", track="tts").candidate_id == good.candidate_id
    assert store.production(DIALECT, "stable") is None  # the ASR track has no production from it
    assert store.get_run(run.run_id).status == "completed"

    # Re-gating it with the candidate as its own judge is refused before anything is synthesized,
    # under its own name or a copy's (the judge's pin and the candidate hashed the same way).
    for judge_dir in (good.adapter_path, shutil.copytree(good.adapter_path, mloc_home / "judge-copy")):
        regate = defs.resolve_job_def(TTS_CANDIDATE_JOB).execute_in_process(
            instance=instance, partition_key=DIALECT, raise_on_error=False,
            asset_selection=[dg.AssetKey("tts_gate_report")], run_config={"ops": {"tts_gate_report": {"config": {
                "candidate_id": good.candidate_id, "settings": {DIALECT: {"judge_dir": str(judge_dir)}}}}}})
        assert not regate.success
        failure = [e for e in regate.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "is the candidate" in failure.step_failure_data.error.message
    assert "under another name" in failure.step_failure_data.error.message
    assert store.get_candidate(good.candidate_id).gate_decision == "passed"  # unchanged

    # A broken TTS run (mislabelled data): its first candidate fails the stop-loss; job 1 waits for
    # that verdict and never trains; the chain pauses the run with the reason, requests nothing
    # more, and a resume continues it.
    bad = start_run(instance, store, StartRequest(DIALECT, jobs=3, candidate_every=1, timebox_s=600, hparams=BROKEN, track="tts"))
    ran, cursor = drive(instance, store, ticks=2)
    assert [name for name, _ in ran] == ["tts_train_adapter_job", TTS_CANDIDATE_JOB], ran
    failed = store.list_candidates(DIALECT, training_run_id=bad.run_id)[0]
    print("broken:", {k: round(v, 3) for k, v in json.loads(open(failed.gate_report_path).read())["figures"].items()})
    assert failed.gate_decision == "failed"
    assert store.production(DIALECT, "stable", track="tts").candidate_id == good.candidate_id  # not promoted
    ran, cursor = drive(instance, store, ticks=2, cursor=cursor)
    paused = store.get_run(bad.run_id)
    assert ran == [] and paused.status == "paused", (ran, paused)
    assert "stop-loss" in paused.status_reason and failed.candidate_id in paused.status_reason
    assert "judge CER" in paused.status_reason

    # The user's decision: the chain goes on (job 1), not paused again for the candidate that paused it.
    assert resume_run(store, bad.run_id)
    result, cursor = tick(instance, store, cursor)
    assert [(r.job_name, r.tags["mloc/job_index"]) for r in result.run_requests] == [("tts_train_adapter_job", "1")]
    assert store.get_run(bad.run_id).status == "active"
    cancel_run(instance, store, bad.run_id)

    # A TTS run whose gate crashes (the pinned judge changed): no verdict, so the run does not
    # complete; it pauses with the reason and its candidate gives its adapter back. Once the judge
    # is fixed, a resume merges and gates the adapter again, and the run completes.
    (mloc_home / "tts_gate.json").write_text(json.dumps({DIALECT: GATE | {"judge_version": "0" * 64}}))
    crash = start_run(instance, store, StartRequest(DIALECT, jobs=1, candidate_every=1, timebox_s=600,
                                                  hparams=WORKING, track="tts"))
    ran, cursor = drive(instance, store, ticks=2, cursor=cursor)
    assert ran == [("tts_train_adapter_job", True), (TTS_CANDIDATE_JOB, False)], ran
    ran, cursor = drive(instance, store, ticks=1, cursor=cursor)
    paused = store.get_run(crash.run_id)
    assert ran == [] and paused.status == "paused", paused
    [released] = store.list_candidates(DIALECT, training_run_id=crash.run_id)
    assert released.gate_decision == "released" and "the gate pins 000000000000" in paused.status_reason
    assert f"before the gate of {released.candidate_id} decided" in paused.status_reason
    assert [r.run_id for r in store.unclaimed_adapters(DIALECT, track="tts")] == [crash.run_id]
    (mloc_home / "tts_gate.json").write_text(json.dumps({DIALECT: GATE}))
    assert resume_run(store, crash.run_id)
    ran, cursor = drive(instance, store, ticks=2, cursor=cursor)
    assert ran == [(TTS_CANDIDATE_JOB, True)], ran
    regated = store.list_candidates(DIALECT, training_run_id=crash.run_id)[0]
    assert regated.gate_decision == "passed" and regated.candidate_id != released.candidate_id
    assert store.get_run(crash.run_id).status == "completed"


def test_tts_runs_refuse_what_they_cannot_be(line_instance):
    store = StateStore(resolve_state_url())
    with pytest.raises(TrainingRunError, match="no tts_base_model yet"):
        start_run(line_instance, store, StartRequest(DIALECT, track="tts"))
    with pytest.raises(TrainingRunError, match="unknown tts hparam"):
        start_run(line_instance, store, StartRequest(DIALECT, track="tts", hparams={"rehearsal_fraction": 0.5}))
    with pytest.raises(TrainingRunError, match="kind single"):
        start_run(line_instance, store, StartRequest(DIALECT, track="tts", kind="distributed", parallelism=2, round_samples=64))
    with pytest.raises(TrainingRunError, match="--track"):
        start_run(line_instance, store, StartRequest(DIALECT, track="video"))
