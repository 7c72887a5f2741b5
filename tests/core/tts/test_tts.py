"""The TTS track's core on real espeak data: alignment, exact resume, the judge, the stop-loss gate.

Budgets are in steps, so a busy machine changes nothing. The loop, resume and judge tests use a
TTS base trained for a single step (they test machinery, not speech). The stop-loss test (slow,
~3 min on 2 shared cores) needs speech the judge can read: a TTS base that memorises 8 en-us
utterances (no dropout, 400 steps), spoken back through Griffin-Lim and back-recognized by the
frozen 150-step test ASR. Measured there (docs/tts.md): judge CER ~0.3 on the real recordings,
~0.45 on the working candidate, ≥ 0.7 (junk) on the broken one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS, TRAIN_STATE_JSON
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.models.families import load_base_model
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.training.checkpoint import ResumeError
from mloc_dagster.core.tts import acoustics
from mloc_dagster.core.tts.align import ctc_viterbi, even_durations
from mloc_dagster.core.tts.hparams import TtsAdapterHParams
from mloc_dagster.core.tts.judge import (
    JudgeIsCandidate,
    JudgeMismatch,
    JudgeSpec,
    TtsGateLimits,
    back_recognize,
    collapse_share,
    load_judge,
    synthesize,
    tts_gates,
)
from mloc_dagster.core.tts.pretrain import pretrain_tts_base
from mloc_dagster.core.tts.training import TtsAdapterJobSpec, load_tts_adapter, train_tts_adapter
from tests.world import build_once

ROWS = 8  # utterances the memorising TTS base learns (and the gate speaks)
BASE_STEPS = 600
ADAPTER_STEPS = 10
GL_ITERATIONS = 16
NO_DROPOUT = {k: 0.0 for k in ("encoder_dropout_rate", "encoder_positional_dropout_rate",
                               "encoder_attention_dropout_rate", "decoder_dropout_rate",
                               "decoder_positional_dropout_rate", "decoder_attention_dropout_rate",
                               "duration_predictor_dropout_rate")}
HALF = 3
RESUME_HPARAMS = {"r": 4, "alpha": 8.0, "dropout": 0.1, "batch_size": 4, "warmup_steps": 2, "seed": 5,
                  "train_limit": 8}


@pytest.fixture(scope="session")
def tts_base(corpus, pretrained_base, tmp_path_factory, worker_id) -> tuple[Path, dict]:
    """A TTS base after one step: a valid model directory for the machinery tests."""
    def build(out: Path) -> dict:
        return pretrain_tts_base(corpus.en_us, pretrained_base[0], out / "tts", train_seconds=600, max_steps=1,
                                 train_limit=8, dev_limit=2, seed=0)

    out, metrics = build_once(tmp_path_factory, worker_id, "tts-base", build)
    return out / "tts", metrics


@pytest.fixture(scope="session")
def speaking_tts(corpus, pretrained_base, tmp_path_factory, worker_id) -> tuple[Path, Path, list[str], list[np.ndarray]]:
    """(TTS base that memorised ROWS en-us utterances, a working adapter on them, their texts and
    real recordings)."""
    asr = pretrained_base[0]

    def build(root: Path) -> dict:
        pretrain_tts_base(corpus.en_us, asr, root / "base", train_seconds=900, max_steps=BASE_STEPS, train_limit=ROWS,
                          dev_limit=2, batch_size=ROWS, lr=3e-3, warmup_steps=10, model_config=NO_DROPOUT, seed=0,
                          schedule="constant")
        train_tts_adapter(TtsAdapterJobSpec(root / "base", asr, corpus.en_us, root / "adapter", timebox_s=600,
                                            max_steps=ADAPTER_STEPS, eval_limit=2,
                                            hparams=TtsAdapterHParams(batch_size=ROWS, lr=1e-3, train_limit=ROWS)))
        return {}

    root, _ = build_once(tmp_path_factory, worker_id, "tts-speaking", build)
    tok = load_base_model(asr).tokenizer
    utts = [u for u in DatasetVersion(corpus.en_us).iter_utterances("train") if tok.encode(u.text)][:ROWS]
    return root / "base", root / "adapter", [u.text for u in utts], [u.audio for u in utts]


@pytest.fixture(scope="session")
def tts_adapter(corpus, pretrained_base, tts_base, tmp_path_factory, worker_id) -> Path:
    def build(out: Path) -> dict:
        train_tts_adapter(TtsAdapterJobSpec(tts_base[0], pretrained_base[0], corpus.scottish, out / "job0",
                                            timebox_s=600, max_steps=2, eval_limit=2,
                                            hparams=TtsAdapterHParams(batch_size=4, train_limit=8)))
        return {}

    return build_once(tmp_path_factory, worker_id, "tts-adapter", build)[0] / "job0"


def _random_like(adapter: Path, out: Path, seed: int = 0) -> Path:
    """A broken adapter: every LoRA matrix replaced by Gaussian noise with the Frobenius norm of
    the module's trained A matrix (peft's Kaiming init scale; B reaches it after long training)."""
    shutil.copytree(adapter, out)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    noisy = {}
    for k, w in weights.items():
        r = torch.randn(w.shape, generator=gen)
        noisy[k] = (r * weights[k.replace("lora_B", "lora_A")].norm() / r.norm()).contiguous()
    save_file(noisy, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- pieces


def test_frames_are_the_asr_features_before_normalization(corpus):
    from mloc_dagster.core.data.features import default_feature_extractor, extract

    u = next(DatasetVersion(corpus.en_us).iter_utterances("test"))
    asr = extract(default_feature_extractor(), [u.audio])[0]
    mine = acoustics.asr_features(acoustics.tts_frames(u.audio))
    assert mine.shape == asr.shape and np.abs(mine - asr).max() < 0.1  # float32 vs float64 variance
    audio = acoustics.griffin_lim(acoustics.tts_frames(u.audio), 8)
    assert abs(len(audio) - len(u.audio)) < 800 and np.abs(audio).max() <= 0.99
    assert acoustics.mel_cepstral_distortion(u.audio, u.audio) == pytest.approx(0.0, abs=1e-6)


def test_ctc_viterbi_assigns_every_frame():
    logp = np.log(np.full((6, 4), 0.01))
    for t, s in enumerate([0, 1, 1, 0, 2, 0]):  # blank a a blank b blank
        logp[t, s] = np.log(0.97)
    path = ctc_viterbi(logp, [1, 2])
    assert path.tolist() == [0, 0, 0, 0, 1, 1]
    assert ctc_viterbi(logp[:1], [1, 2]) is None  # infeasible: fallback to even durations
    assert even_durations(7, 3).tolist() == [2, 3, 2]


# --------------------------------------------------------------------------- the loop


def _spec(base: Path, asr: Path, corpus, out: Path, **kw) -> TtsAdapterJobSpec:
    kw.setdefault("hparams", TtsAdapterHParams(**RESUME_HPARAMS))
    return TtsAdapterJobSpec(base, asr, corpus.scottish, out, timebox_s=600, checkpoint_every_s=1e9,
                             eval_limit=2, **kw)


def test_two_half_jobs_equal_one_full_job(tts_base, pretrained_base, corpus, tmp_path):
    base, asr = tts_base[0], pretrained_base[0]
    full = train_tts_adapter(_spec(base, asr, corpus, tmp_path / "full", max_steps=2 * HALF))
    first = train_tts_adapter(_spec(base, asr, corpus, tmp_path / "job0", max_steps=HALF,
                                    checkpoint_every_steps=2))
    second = train_tts_adapter(_spec(base, asr, corpus, tmp_path / "job1", max_steps=HALF,
                                     resume_from=tmp_path / "job0"))
    assert (first.total_steps, second.total_steps, second.resumed_kind) == (HALF, 2 * HALF, "resume_from")
    assert first.loss_history + second.loss_history == full.loss_history  # bit-exact on CPU
    wa, wb = load_file(str(tmp_path / "full" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "job1" / ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    state = json.loads((tmp_path / "job1" / TRAIN_STATE_JSON).read_text())
    assert state["identity"]["track"] == "tts" and len(state["jobs"]) == 2
    assert not (tmp_path / "job0.partial").exists()  # the partial checkpoint is gone once the job is done
    assert train_tts_adapter(_spec(base, asr, corpus, tmp_path / "job1", max_steps=HALF)).resumed_kind == "reused"

    with pytest.raises(ResumeError, match="hyper-parameters"):
        train_tts_adapter(_spec(base, asr, corpus, tmp_path / "bad", max_steps=1, resume_from=tmp_path / "job0",
                                hparams=TtsAdapterHParams(**(RESUME_HPARAMS | {"shuffle_texts": True}))))


def test_timebox_stops_the_job(tts_base, pretrained_base, corpus, tmp_path):
    r = train_tts_adapter(TtsAdapterJobSpec(tts_base[0], pretrained_base[0], corpus.scottish, tmp_path / "tb",
                                            timebox_s=12, eval_limit=2,
                                            hparams=TtsAdapterHParams(batch_size=4, train_limit=8)))
    assert r.stop_reason == "timebox" and r.steps > 0 and r.wall_seconds < 12


# --------------------------------------------------------------------------- judge and gate


def test_the_candidate_cannot_be_its_own_judge(tts_base, tts_adapter, pretrained_base, tmp_path):
    with pytest.raises(JudgeIsCandidate):
        load_judge(JudgeSpec.pin(tts_adapter), candidate_dir=tts_adapter)
    copy = shutil.copytree(tts_adapter, tmp_path / "copy")
    with pytest.raises(JudgeIsCandidate, match="under another name"):  # same content, hashed like the pin
        load_judge(JudgeSpec.pin(copy), candidate_dir=tts_adapter)
    with pytest.raises(JudgeIsCandidate, match="TTS model"):
        load_judge(JudgeSpec.pin(tts_base[0]), candidate_dir=tts_adapter)
    with pytest.raises(JudgeMismatch):  # the pin is a version: a changed judge is refused
        load_judge(JudgeSpec(str(pretrained_base[0]), "0" * 64), candidate_dir=tts_adapter)


@pytest.mark.slow
def test_stop_loss_gate_passes_working_and_fires_on_broken_adapter(speaking_tts, pretrained_base, tmp_path):
    base, adapter, texts, real = speaking_tts
    judge = load_judge(JudgeSpec.pin(pretrained_base[0]), candidate_dir=adapter)
    floor = back_recognize(judge, real, texts)
    working = back_recognize(judge, synthesize(load_tts_adapter(base, adapter), texts, gl_iterations=GL_ITERATIONS),
                             texts)
    broken_dir = _random_like(adapter, tmp_path / "broken")
    broken = back_recognize(judge, synthesize(load_tts_adapter(base, broken_dir), texts, gl_iterations=GL_ITERATIONS),
                            texts)
    print(f"judge CER real {floor['cer']:.3f} working {working['cer']:.3f} broken {broken['cer']:.3f}; "
          f"collapse working {collapse_share(working['utterance_cer']):.2f} "
          f"broken {collapse_share(broken['utterance_cer']):.2f}")

    # limits calibrated on the floor: the judge's own errors on real speech plus a margin
    limits = TtsGateLimits(max_cer=floor["cer"] + 0.3, max_collapse_share=0.75)
    passed = tts_gates(working["cer"], collapse_share(working["utterance_cer"]), limits, floor["cer"],
                       collapse_share(floor["utterance_cer"]))
    fired = tts_gates(broken["cer"], collapse_share(broken["utterance_cer"]), limits, floor["cer"])
    assert all(g.passed for g in passed), passed
    assert not any(g.passed for g in fired), fired
    assert passed[0].floor == floor["cer"] and "real recordings" in passed[0].description
    assert working["judge_version"] == model_dir_hash(pretrained_base[0])


def test_gates_fail_on_nothing_measured():
    results = tts_gates(float("nan"), float("nan"), TtsGateLimits())
    assert [g.name for g in results] == ["tts_intelligibility_gate", "tts_collapse_gate"]
    assert not any(g.passed for g in results)
