"""The training loops on real espeak data: learning, exact resume (also across SIGKILL), timebox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS, TRAIN_STATE_JSON, InvalidAdapter
from mloc_dagster.core.data.features import load_features
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import load_base_model
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.checkpoint import ResumeError, latest_partial, partial_dir
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

N = 4  # steps before the interruption
# dropout > 0, so the RNG state has to be restored exactly too
RESUME_HPARAMS = {"r": 4, "alpha": 8.0, "dropout": 0.1, "batch_size": 8, "warmup_steps": 3, "seed": 7}


def _spec(base: Path, corpus, out: Path, **kw) -> AdapterJobSpec:
    kw.setdefault("hparams", AdapterHParams(**RESUME_HPARAMS))
    return AdapterJobSpec(base_model_dir=base, dataset_version_path=corpus.scottish, out_dir=out, timebox_s=600,
                          checkpoint_every_s=1e9, feature_cache_dir=corpus.feature_cache, **kw)


def _state(path: Path) -> dict:
    return json.loads((path / TRAIN_STATE_JSON).read_text())


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / ADAPTER_WEIGHTS)), load_file(str(b / ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_pretrained_base_transcribes(pretrained_base):
    _, metrics = pretrained_base
    assert metrics["steps"] > 0 and metrics["parameters"] > 1e6
    assert metrics["dev_cer"] < 0.9 and metrics["test_cer"] < 0.9  # learned something in a few steps


def test_lora_lowers_loss_and_dev_cer(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    bm = load_base_model(base)
    dev = load_features(corpus.scottish, "dev", cache_dir=corpus.feature_cache)
    before = error_rates(transcribe(bm.model, bm.family, dev))["cer"]

    result = train_adapter(AdapterJobSpec(base, corpus.scottish, tmp_path / "adapter", timebox_s=600,
                                          max_steps=40, feature_cache_dir=corpus.feature_cache))
    assert result.steps == 40 and result.stop_reason == "max_steps"
    first, last = result.loss_history[:5], result.loss_history[-5:]
    assert sum(last) / 5 < 0.9 * sum(first) / 5
    assert result.dev_cer < before - 0.02, (before, result.dev_cer)
    assert result.sha256 and len(result.loss_history) == 40 and result.samples_per_s > 0


def test_chained_jobs_reproduce_the_uninterrupted_run(pretrained_base, corpus, tmp_path):
    """Job 0 (N steps) → job 1 (N more, resume_from job 0) == one 2N-step job; with en-us rehearsal
    rows mixed into the data stream."""
    base, _ = pretrained_base
    full = train_adapter(_spec(base, corpus, tmp_path / "full", max_steps=2 * N, rehearsal_dataset_path=corpus.en_us))
    first = train_adapter(_spec(base, corpus, tmp_path / "job0", max_steps=N, rehearsal_dataset_path=corpus.en_us))
    second = train_adapter(_spec(base, corpus, tmp_path / "job1", max_steps=N, resume_from=tmp_path / "job0",
                                 rehearsal_dataset_path=corpus.en_us))

    assert (first.total_steps, second.total_steps, second.resumed_kind) == (N, 2 * N, "resume_from")
    assert first.loss_history + second.loss_history == pytest.approx(full.loss_history, abs=1e-6)
    assert _state(tmp_path / "job1")["loss_history"] == pytest.approx(full.loss_history, abs=1e-6)
    _assert_same_adapter(tmp_path / "full", tmp_path / "job1")
    assert _state(tmp_path / "job1")["data"] == _state(tmp_path / "full")["data"]
    assert len(_state(tmp_path / "job1")["jobs"]) == 2
    data = _state(tmp_path / "job1")["data"]
    f = AdapterHParams(**RESUME_HPARAMS).rehearsal_fraction  # that share of each epoch is en-us rows
    assert data["extra_rows"] > 0 and data["extra_per_epoch"] == round(data["rows"] * f / (1 - f))

    with pytest.raises(ResumeError, match="rehearsal_version"):  # a run pins its data, rehearsal included
        train_adapter(_spec(base, corpus, tmp_path / "norehearsal", max_steps=1, resume_from=tmp_path / "job0"))

    with pytest.raises(ResumeError, match="hyper-parameters"):
        train_adapter(_spec(base, corpus, tmp_path / "bad", max_steps=1, resume_from=tmp_path / "job0",
                            hparams=AdapterHParams(**(RESUME_HPARAMS | {"r": 8}))))


_CHILD = r"""
import json, sys, time
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec
from mloc_dagster.core.training.asr import train_adapter
a = json.loads(sys.argv[1])

def progress(p):
    if p.event == "checkpoint":
        print("CHECKPOINT", p.step, flush=True)
        time.sleep(3600)  # the parent kills us here, mid-job

train_adapter(AdapterJobSpec(a["base"], a["data"], a["out"], timebox_s=600, checkpoint_every_s=1e9,
                             checkpoint_every_steps=a["every"], max_steps=a["steps"], progress=progress,
                             progress_every_s=0, feature_cache_dir=a["cache"],
                             hparams=AdapterHParams(**a["hparams"])))
"""


@pytest.mark.parametrize("family", ["tiny", "whisper"])
def test_resume_after_sigkill_is_exact(family, pretrained_base, corpus, tmp_path):
    """A job killed after its checkpoint at step N resumes from it and ends exactly where an
    uninterrupted job does: the built-in model and Whisper (an encoder-decoder, teacher-forced)."""
    from tests.core.models.families import save_tiny_checkpoint

    base = pretrained_base[0] if family == "tiny" else save_tiny_checkpoint(family, tmp_path / family)
    full = train_adapter(_spec(base, corpus, tmp_path / "full", max_steps=2 * N))

    out = tmp_path / "job"
    args = {"base": str(base), "data": str(corpus.scottish), "out": str(out), "cache": str(corpus.feature_cache),
            "every": N, "steps": 2 * N, "hparams": RESUME_HPARAMS}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == f"CHECKPOINT {N}", (line, child.stderr.read() if child.poll() is not None else "")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and latest_partial(out).name == f"step-{N:09d}"

    # The retry of the same job finds the intermediate checkpoint and finishes the job's 2N steps.
    resumed = train_adapter(_spec(base, corpus, out, max_steps=2 * N))
    assert resumed.resumed_kind == "partial" and resumed.steps == resumed.total_steps == 2 * N
    assert resumed.samples == 2 * N * RESUME_HPARAMS["batch_size"]
    assert resumed.loss_history == pytest.approx(full.loss_history, abs=1e-6)
    assert _state(out)["loss_history"] == pytest.approx(full.loss_history, abs=1e-6)
    _assert_same_adapter(tmp_path / "full", out)
    assert not partial_dir(out).exists()

    # A retry after the job finished returns the stored result instead of training again.
    again = train_adapter(_spec(base, corpus, out, max_steps=2 * N))
    assert again.resumed_kind == "reused" and again.sha256 == resumed.sha256


def test_timebox_20s_returns_in_time(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    beats = []
    t0 = time.monotonic()
    result = train_adapter(AdapterJobSpec(base, corpus.scottish, tmp_path / "tb", timebox_s=20, checkpoint_every_s=5,
                                          feature_cache_dir=corpus.feature_cache, heartbeat=lambda: beats.append(1),
                                          heartbeat_every_s=1))
    wall = time.monotonic() - t0
    assert wall < 20, result.metrics
    assert result.stop_reason == "timebox" and result.steps > 0 and result.wall_seconds < 20
    assert result.train_seconds + result.overhead_seconds == pytest.approx(result.wall_seconds, abs=0.5)
    assert result.checkpoints_written >= 2 and beats  # intermediate checkpoints every 5 s, plus the final


def test_heartbeat_false_stops_cleanly(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    calls = []

    def heartbeat():
        calls.append(1)
        return len(calls) < 3

    result = train_adapter(_spec(base, corpus, tmp_path / "hb", max_steps=1000, heartbeat=heartbeat,
                                 heartbeat_every_s=0))
    assert result.stop_reason == "heartbeat" and result.steps == 2
    assert (tmp_path / "hb" / ADAPTER_WEIGHTS).is_file()


def test_refuses_to_resume_from_an_unsafe_checkpoint(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    train_adapter(_spec(base, corpus, tmp_path / "ok", max_steps=1))
    (tmp_path / "ok" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InvalidAdapter, match="optimizer.pt"):
        train_adapter(_spec(base, corpus, tmp_path / "next", max_steps=1, resume_from=tmp_path / "ok"))


def test_distillation_resumes_exactly_and_records_the_learning_curve(pretrained_base, corpus, tmp_path):
    """distill_weight > 0 (KL to the frozen base on rehearsal rows) changes the loss and keeps exact
    resume; every checkpoint carries the run's learning curve (dev CER per job)."""
    base, _ = pretrained_base
    hp = AdapterHParams(**RESUME_HPARAMS)  # defaults: 75 % rehearsal, distill_weight 3.0
    assert (hp.rehearsal_fraction, hp.distill_weight) == (0.75, 3.0)
    kw = {"rehearsal_dataset_path": corpus.en_us, "hparams": hp}
    full = train_adapter(_spec(base, corpus, tmp_path / "full", max_steps=2 * N, **kw))
    first = train_adapter(_spec(base, corpus, tmp_path / "job0", max_steps=N, job_index=0, **kw))
    second = train_adapter(_spec(base, corpus, tmp_path / "job1", max_steps=N, job_index=1,
                                 resume_from=tmp_path / "job0", **kw))
    assert first.loss_history + second.loss_history == pytest.approx(full.loss_history, abs=1e-6)
    _assert_same_adapter(tmp_path / "full", tmp_path / "job1")
    plain = train_adapter(_spec(base, corpus, tmp_path / "plain", max_steps=2 * N, rehearsal_dataset_path=corpus.en_us,
                                hparams=AdapterHParams(**(RESUME_HPARAMS | {"distill_weight": 0.0}))))
    assert plain.loss_history != pytest.approx(full.loss_history, abs=1e-6)  # the KL term trains differently

    assert [c["job_index"] for c in second.learning_curve] == [0, 1]
    assert [c["dev_cer"] for c in second.learning_curve] == [first.dev_cer, second.dev_cer]
    assert first.dev_cer_delta is None and second.dev_cer_delta == pytest.approx(second.dev_cer - first.dev_cer)
    assert second.dev_speakers >= 1 and second.dev_utterances > 0
    assert _state(tmp_path / "job1")["jobs"][1]["dev_cer"] == second.dev_cer
