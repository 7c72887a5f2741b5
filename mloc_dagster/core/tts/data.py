"""TTS training rows from a dataset version: characters, durations, frames, pitch and energy.

For every utterance of a split: the target frames (``acoustics.tts_frames``), the transcript's
character ids (the ASR's tokenizer), their durations from the base ASR's forced alignment
(``align.py``; frames are cut to the durations' sum, at most one 20 ms frame), and per character
the mean frame energy (mean log-mel) over its frames — FastSpeech 2's token-averaged energy.
Pitch is not modelled: its labels are 0 (``librosa.yin`` cost 75 ms per utterance, twice the rest
of the preparation, and an espeak speaker's pitch is a constant of its voice). Frames, pitch and energy are standardized with
``TtsStats`` (computed on the base dialect's training rows by ``fit_stats``).

``shuffle_texts`` pairs every recording with another utterance's text: the broken-adapter
control of the stop-loss tests (a TTS trained on it learns to mumble).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mloc_dagster.core.data.datasets import DatasetVersion, Utterance
from mloc_dagster.core.data.features import FeatureSet
from mloc_dagster.core.models.base import BaseModel
from mloc_dagster.core.tts.acoustics import FRAME_DIM, MEL_BINS, STACK, asr_features, tts_frames
from mloc_dagster.core.tts.align import align_durations
from mloc_dagster.core.tts.model import TtsStats


@dataclass
class TtsRows:
    """Raw (unstandardized) rows of one split."""

    utt_ids: list[str]
    texts: list[str]
    speakers: list[str]
    ids: list[np.ndarray]  # [L] character ids
    durations: list[np.ndarray]  # [L] in 20 ms frames
    frames: list[np.ndarray]  # [sum(durations), 160]
    pitch: list[np.ndarray]  # [L] zeros (pitch is not modelled)
    energy: list[np.ndarray]  # [L]
    align_fallbacks: int = 0

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def frame_count(self) -> int:
        return int(sum(len(f) for f in self.frames))


def _frame_energy(frames: np.ndarray) -> np.ndarray:
    """Per 20 ms frame: mean log-mel."""
    return frames.reshape(len(frames), STACK, MEL_BINS).mean(axis=(1, 2))


def _per_token(values: np.ndarray, durations: np.ndarray) -> np.ndarray:
    ends = np.cumsum(durations)
    out = np.zeros(len(durations), dtype=np.float32)
    for k, (a, b) in enumerate(zip(ends - durations, ends)):
        if b > a:
            out[k] = float(values[a:b].mean())
    return out


def build_rows(utterances: Sequence[Utterance], aligner: BaseModel) -> TtsRows:
    """Rows for utterances, durations aligned by ``aligner`` (the frozen base ASR)."""
    utts = [u for u in utterances if aligner.tokenizer.encode(u.text)]
    frames = [tts_frames(u.audio) for u in utts]
    labels = [aligner.tokenizer.encode(u.text) for u in utts]
    fs = FeatureSet.from_arrays(utts, [asr_features(f) for f in frames], FRAME_DIM)
    durations, fallbacks = align_durations(aligner, fs, labels)
    rows = TtsRows([u.utt_id for u in utts], [u.text for u in utts], [u.speaker for u in utts],
                   [], [], [], [], [], fallbacks)
    for f, lab, d in zip(frames, labels, durations):
        f = f[:int(d.sum())]
        energy = _frame_energy(f)
        rows.ids.append(np.asarray(lab, dtype=np.int64))
        rows.durations.append(d)
        rows.frames.append(f)
        rows.pitch.append(np.zeros(len(d), dtype=np.float32))
        rows.energy.append(_per_token(energy, d))
    return rows


def load_rows(version: str | DatasetVersion, split: str, aligner: BaseModel, limit: int | None = None) -> TtsRows:
    dv = version if isinstance(version, DatasetVersion) else DatasetVersion(version)
    utts = []
    for u in dv.iter_utterances(split):
        utts.append(u)
        if limit is not None and len(utts) >= limit:
            break
    return build_rows(utts, aligner)


def fit_stats(rows: TtsRows) -> TtsStats:
    frames = np.concatenate(rows.frames)
    energy = np.concatenate([e[d > 0] for e, d in zip(rows.energy, rows.durations)])
    return TtsStats(frames.mean(0).tolist(), (frames.std(0) + 1e-3).tolist(), 0.0, 1.0,
                    float(energy.mean()), float(energy.std() + 1e-3))


def shuffle_texts(rows: TtsRows, seed: int = 0) -> TtsRows:
    """Each recording paired with another row's characters (durations spread evenly over them)."""
    from mloc_dagster.core.tts.align import even_durations

    perm = np.random.default_rng(seed).permutation(len(rows))
    out = TtsRows(list(rows.utt_ids), [rows.texts[j] for j in perm], list(rows.speakers), [], [],
                  list(rows.frames), [], [], rows.align_fallbacks)
    for i, j in enumerate(perm):
        n = len(rows.ids[j])
        d = even_durations(len(rows.frames[i]), n)
        out.ids.append(rows.ids[j])
        out.durations.append(d)
        out.pitch.append(np.zeros(n, dtype=np.float32))
        out.energy.append(np.full(n, float(np.mean(rows.energy[i])), dtype=np.float32))
    return out


def make_tts_batch(rows: TtsRows, stats: TtsStats, idx: Sequence[int], device: str = "cpu") -> tuple[dict, int]:
    """Rows ``idx`` as padded FastSpeech2Conformer inputs and labels, and the batch's frame count.
    Padding: character id 0 with duration 0; frames -100 (the model's spectrogram mask)."""
    mean, std = stats.tensors()
    n_tok = max(len(rows.ids[i]) for i in idx)
    n_fr = max(len(rows.frames[i]) for i in idx)
    b = len(idx)
    ids = torch.zeros(b, n_tok, dtype=torch.long)
    mask = torch.zeros(b, n_tok, dtype=torch.long)
    dur = torch.zeros(b, n_tok, dtype=torch.long)
    pitch = torch.zeros(b, n_tok, 1)
    energy = torch.zeros(b, n_tok, 1)
    spec = torch.full((b, n_fr, FRAME_DIM), -100.0)
    for r, i in enumerate(idx):
        n, t = len(rows.ids[i]), len(rows.frames[i])
        ids[r, :n] = torch.from_numpy(rows.ids[i])
        mask[r, :n] = 1
        dur[r, :n] = torch.from_numpy(rows.durations[i])
        voiced = torch.from_numpy(rows.durations[i]) > 0  # a character with no frame has no pitch: the mean
        pitch[r, :n, 0] = torch.where(voiced, (torch.from_numpy(rows.pitch[i]) - stats.pitch_mean) / stats.pitch_std, 0.0)
        energy[r, :n, 0] = torch.where(voiced, (torch.from_numpy(rows.energy[i]) - stats.energy_mean) / stats.energy_std,
                                       0.0)
        spec[r, :t] = (torch.from_numpy(rows.frames[i]) - mean) / std
    batch = {"input_ids": ids, "attention_mask": mask, "spectrogram_labels": spec, "duration_labels": dur,
             "pitch_labels": pitch, "energy_labels": energy}
    frames = int(sum(len(rows.frames[i]) for i in idx))
    return {k: v.to(device) for k, v in batch.items()}, frames
