"""The TTS stop-loss as one call: a candidate speaks, a frozen judge listens, the gates decide.

``judge_candidate`` takes the first ``sentences`` utterances of a dataset split and measures, side
by side with one judge:

- the floor: the judge's CER on the **real recordings** (what it gets wrong on real speech);
- the **base TTS**: the same sentences synthesized by the TTS base alone;
- the **candidate**: synthesized by the base with the candidate adapter merged in;
- the mel-cepstral distortion (after DTW) of base TTS and candidate against the real recordings,
  so a user sees whether the adapter moved the voice toward the dialect.

The gates (``judge.tts_gates``) are calibrated on the floor: ``max_cer = floor +
max_cer_over_floor``. A few wav samples (real, base, candidate) and ``report.json`` are written to
``out_dir``; the returned dict carries the markdown report with links to them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf

from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import SAMPLING_RATE
from mloc_dagster.core.tts.acoustics import mean_mcd
from mloc_dagster.core.tts.judge import (
    Judge,
    TtsGateLimits,
    back_recognize,
    collapse_share,
    synthesize,
    tts_gates,
)
from mloc_dagster.core.tts.model import load_tts_model
from mloc_dagster.core.tts.training import load_tts_adapter


def spoken_sentences(judge: Judge, dataset_version: str | Path, split: str, n: int) -> tuple[list[str], list[np.ndarray]]:
    """The first ``n`` utterances of ``split`` whose text the judge can spell: (texts, recordings)."""
    texts, audio = [], []
    dv = DatasetVersion(dataset_version)
    for u in dv.iter_utterances(split):
        if judge.asr.family.labels(u.text, dv.dialect):
            texts.append(u.text)
            audio.append(u.audio)
        if len(texts) >= n:
            break
    if not texts:
        raise ValueError(f"{dataset_version}: no {split} utterance to speak")
    return texts, audio


def judge_candidate(judge: Judge, base_tts_dir: str | Path, adapter_dir: str | Path,
                    dataset_version: str | Path, out_dir: str | Path, *, split: str = "test", sentences: int = 20,
                    gl_iterations: int = 32, max_cer_over_floor: float = 0.3, max_collapse_share: float = 0.5,
                    collapse_cer: float = 0.5, samples_kept: int = 3, device: str = "cpu") -> dict:
    """Measure floor, base TTS and candidate with ``judge``; decide the two gates; write samples
    and ``report.json`` under ``out_dir``. Returns passed, gates, figures and markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts, real = spoken_sentences(judge, dataset_version, split, sentences)
    base_audio = synthesize(load_tts_model(base_tts_dir, device), texts, device, gl_iterations)
    cand_audio = synthesize(load_tts_adapter(base_tts_dir, adapter_dir, device), texts, device, gl_iterations)
    dialect = DatasetVersion(dataset_version).dialect
    heard = {name: back_recognize(judge, audio, texts, device, dialect)
             for name, audio in (("real", real), ("base", base_audio), ("candidate", cand_audio))}
    collapse = {name: collapse_share(h["utterance_cer"], collapse_cer) for name, h in heard.items()}
    mcd = {"base": mean_mcd(base_audio, real), "candidate": mean_mcd(cand_audio, real)}
    limits = TtsGateLimits(max_cer=heard["real"]["cer"] + max_cer_over_floor,
                           max_collapse_share=max_collapse_share, collapse_cer=collapse_cer)
    gates = tts_gates(heard["candidate"]["cer"], collapse["candidate"], limits, heard["real"]["cer"],
                      collapse["real"])
    samples = write_samples(out, texts, {"real": real, "base": base_audio, "candidate": cand_audio}, samples_kept)
    figures = {
        "judge_cer_real": heard["real"]["cer"], "judge_cer_base_tts": heard["base"]["cer"],
        "judge_cer_candidate": heard["candidate"]["cer"], "collapse_real": collapse["real"],
        "collapse_base_tts": collapse["base"], "collapse_candidate": collapse["candidate"],
        "mcd_base_tts_db": mcd["base"], "mcd_candidate_db": mcd["candidate"],
        "max_cer": limits.max_cer, "sentences": len(texts),
    }
    report = {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates], "figures": figures,
              "judge": {"model_dir": judge.spec.model_dir, "version": judge.spec.version},
              "split": split, "samples": samples,
              "transcripts": {name: [{"ref": r["ref"], "hyp": r["hyp"]} for r in h["records"][:samples_kept]]
                              for name, h in heard.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    return report | {"markdown": markdown(report)}


def write_samples(out: Path, texts: list[str], audio: dict[str, list[np.ndarray]], kept: int) -> list[dict]:
    samples = []
    for i, text in enumerate(texts[:kept]):
        row = {"text": text}
        for name, waves in audio.items():
            path = out / f"sample-{i}-{name}.wav"
            sf.write(path, np.clip(np.asarray(waves[i], dtype=np.float32), -1.0, 1.0), SAMPLING_RATE)
            row[name] = str(path)
        samples.append(row)
    return samples


def markdown(report: dict) -> str:
    f, judge = report["figures"], report["judge"]
    lines = [f"**{'passed' if report['passed'] else 'STOP-LOSS: failed'}** — judge `{judge['version'][:12]}` "
             f"({judge['model_dir']}), {f['sentences']} {report['split']} sentences", "",
             "| audio | judge CER | share with CER > 0.5 | MCD vs real (dB) |", "|---|---|---|---|",
             f"| real recordings (floor) | {f['judge_cer_real']:.3f} | {f['collapse_real']:.2f} | 0 |",
             f"| base TTS | {f['judge_cer_base_tts']:.3f} | {f['collapse_base_tts']:.2f} | {f['mcd_base_tts_db']:.1f} |",
             f"| candidate | {f['judge_cer_candidate']:.3f} | {f['collapse_candidate']:.2f} | "
             f"{f['mcd_candidate_db']:.1f} |", "", "| gate | passed | |", "|---|---|---|"]
    lines += [f"| {g['name']} | {'yes' if g['passed'] else 'NO'} | {g['description']} |" for g in report["gates"]]
    lines += ["", "Samples (16 kHz wav):", ""]
    lines += [f"- “{s['text']}”: [real](file://{s['real']}) · [base TTS](file://{s['base']}) · "
              f"[candidate](file://{s['candidate']})" for s in report["samples"]]
    return "\n".join(lines) + "\n"
