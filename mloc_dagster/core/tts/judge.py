"""Synthesis, the frozen judge ASR, and the TTS stop-loss gates.

**Synthesis.** ``synthesize`` runs the TTS model one sentence at a time (in eval mode the decoder
has no padding mask, so a batch would let sentences see each other's padding), with the durations
it predicts, then the Griffin-Lim vocoder: a list of 16 kHz waveforms.

**The judge.** A TTS candidate is judged by an ASR that does not move: ``JudgeSpec`` names an ASR
model directory *and* pins its content hash (``core.publish.model_dir_hash``). ``load_judge``
refuses a directory whose hash differs from the pin (``JudgeMismatch``: the judge never changes
silently) and a judge that is the candidate itself, lies inside the candidate's directory, or is
a TTS model (``JudgeIsCandidate``). ``back_recognize`` transcribes waveforms with the judge
(``core.models.evaluate.transcribe``: the judge's own front end and decoding, as in every ASR
evaluation; any supported ASR family can judge) and scores them against the sentences.

**The gates** (``tts_gates``): ``tts_intelligibility_gate`` passes when the judge's CER on the
candidate's audio is ≤ ``max_cer``; ``tts_collapse_gate`` passes when the share of utterances whose
own CER exceeds ``collapse_cer`` (0.5) is ≤ ``max_collapse_share``. The judge's CER on the real
test recordings (the floor: what the judge gets wrong on real speech) is reported beside both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer
import numpy as np
import torch

from mloc_dagster.core.data.datasets import Utterance
from mloc_dagster.core.models.base import BaseModel
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import load_base_model
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.tts.acoustics import griffin_lim
from mloc_dagster.core.tts.model import TtsModel, is_tts_model_dir

# --------------------------------------------------------------------------- synthesis


@torch.inference_mode()
def synthesize_frames(tm: TtsModel, texts: Sequence[str], device: str = "cpu") -> list[np.ndarray]:
    """[T, 160] log-mel frames (de-standardized) per sentence."""
    model = tm.model
    was_training = model.training
    model.eval()
    mean, std = (t.to(device) for t in tm.stats.tensors())
    out = []
    try:
        for text in texts:
            ids = tm.tokenizer.encode(text) or [tm.tokenizer.vocab.get(tm.tokenizer.word_delimiter, 1)]
            x = torch.tensor([ids], dtype=torch.long, device=device)
            spec = model(input_ids=x, attention_mask=torch.ones_like(x), return_dict=True).spectrogram
            out.append((spec[0] * std + mean).float().cpu().numpy())
    finally:
        model.train(was_training)
    return out


def synthesize(tm: TtsModel, texts: Sequence[str], device: str = "cpu", gl_iterations: int = 32) -> list[np.ndarray]:
    """16 kHz float32 waveforms, one per sentence (model frames → Griffin-Lim)."""
    return [griffin_lim(f, gl_iterations) for f in synthesize_frames(tm, texts, device)]


# --------------------------------------------------------------------------- the judge


class JudgeError(ValueError):
    """The judge configuration cannot be used."""


class JudgeMismatch(JudgeError):
    """The judge directory's content is not the pinned version."""


class JudgeIsCandidate(JudgeError):
    """The configured judge is the candidate (or not an ASR at all)."""


@dataclass(frozen=True)
class JudgeSpec:
    """A frozen ASR judge: its model directory and the content hash it is pinned to."""

    model_dir: str
    version: str  # model_dir_hash of model_dir

    @classmethod
    def pin(cls, model_dir: str | Path) -> JudgeSpec:
        return cls(str(model_dir), model_dir_hash(model_dir))


@dataclass
class Judge:
    spec: JudgeSpec
    asr: BaseModel


def check_not_candidate(spec: JudgeSpec, candidate_dir: str | Path) -> None:
    """Raise ``JudgeIsCandidate`` when the judge is the candidate: same directory or inside it,
    the same content under another name (both sides hashed the same way, ``model_dir_hash``:
    the judge's pin is compared with the candidate directory's hash, never with a file's), or a
    TTS model directory."""
    judge, cand = Path(spec.model_dir).resolve(), Path(candidate_dir).resolve()
    if judge == cand or cand in judge.parents:
        raise JudgeIsCandidate(f"judge {spec.model_dir} is the candidate {candidate_dir}; "
                               "name a frozen ASR (the promoted base ASR or an ASR adapter)")
    if spec.version == model_dir_hash(cand):
        raise JudgeIsCandidate(f"judge {spec.model_dir} (version {spec.version[:12]}) is the candidate "
                               f"{candidate_dir} under another name; name a frozen ASR")
    if is_tts_model_dir(judge):
        raise JudgeIsCandidate(f"judge {spec.model_dir} is a TTS model, not an ASR")


def load_judge(spec: JudgeSpec, candidate_dir: str | Path, device: str = "cpu") -> Judge:
    """The frozen judge ASR, after checking it is not the candidate and is the pinned version."""
    check_not_candidate(spec, candidate_dir)
    actual = model_dir_hash(spec.model_dir)
    if actual != spec.version:
        raise JudgeMismatch(f"judge {spec.model_dir} has version {actual[:12]}, the gate pins {spec.version[:12]}; "
                            "re-pin the judge on purpose (the report names the version) or restore it")
    asr = load_base_model(spec.model_dir, device)
    for p in asr.model.parameters():
        p.requires_grad_(False)
    return Judge(spec, asr)


def back_recognize(judge: Judge, waveforms: Sequence[np.ndarray], texts: Sequence[str],
                   device: str = "cpu", dialect: str | None = None) -> dict:
    """The judge's transcripts of ``waveforms`` scored against ``texts``: corpus ``cer``/``wer``
    (``core.models.evaluate.error_rates``) plus ``utterance_cer`` (one per waveform) and ``records``."""
    if len(waveforms) != len(texts):
        raise ValueError(f"{len(waveforms)} waveforms for {len(texts)} sentences")
    utts = [Utterance(f"u{i:05d}", np.asarray(w, dtype=np.float32), t, "tts", "tts", len(w) / 16_000, "")
            for i, (w, t) in enumerate(zip(waveforms, texts))]
    records = transcribe(judge.asr.model, judge.asr.family, utts, device=device,
                         feature_extractor=judge.asr.feature_extractor, dialect=dialect)
    rates = error_rates(records)
    per_utt = [float(jiwer.cer(r["ref"], r["hyp"])) if r["ref"] else 0.0 for r in records]
    return rates | {"utterance_cer": per_utt, "records": records, "judge_version": judge.spec.version}


def collapse_share(utterance_cer: Sequence[float], collapse_cer: float = 0.5) -> float:
    """Share of utterances whose CER exceeds ``collapse_cer``."""
    return float(np.mean([c > collapse_cer for c in utterance_cer])) if len(utterance_cer) else float("nan")


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class TtsGateLimits:
    max_cer: float = 0.35  # judge CER on the candidate's audio
    max_collapse_share: float = 0.2  # share of utterances with judge CER > collapse_cer
    collapse_cer: float = 0.5


@dataclass
class TtsGateResult:
    name: str  # tts_intelligibility_gate | tts_collapse_gate
    passed: bool
    value: float
    limit: float
    floor: float | None  # the same measure on the real test recordings
    description: str


def tts_gates(judge_cer: float, collapse: float, limits: TtsGateLimits,
              floor_cer: float | None = None, floor_collapse: float | None = None) -> list[TtsGateResult]:
    """The two stop-loss gates; a NaN value fails (nothing was measured)."""
    def ok(v: float, limit: float) -> bool:
        return bool(np.isfinite(v) and v <= limit)

    def vs(passed: bool) -> str:
        return "≤" if passed else ">"

    floor_txt = f" (real recordings: {floor_cer:.3f})" if floor_cer is not None else ""
    coll_txt = f" (real recordings: {floor_collapse:.2f})" if floor_collapse is not None else ""
    cer_ok, coll_ok = ok(judge_cer, limits.max_cer), ok(collapse, limits.max_collapse_share)
    return [
        TtsGateResult("tts_intelligibility_gate", cer_ok, judge_cer, limits.max_cer, floor_cer,
                      f"judge CER {judge_cer:.3f} {vs(cer_ok)} {limits.max_cer:.3f}{floor_txt}"),
        TtsGateResult("tts_collapse_gate", coll_ok, collapse, limits.max_collapse_share, floor_collapse,
                      f"share of utterances with CER > {limits.collapse_cer:.2f}: {collapse:.2f} {vs(coll_ok)} "
                      f"{limits.max_collapse_share:.2f}{coll_txt}"),
    ]


def gate_report(results: Sequence[TtsGateResult]) -> dict:
    return {"passed": all(r.passed for r in results), "gates": [asdict(r) for r in results]}
