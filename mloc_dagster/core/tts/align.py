"""Character durations from a CTC forced alignment of the training audio by the base ASR.

FastSpeech 2 learns durations from labels: how many output frames each input character lasts.
They come from the frozen base ASR: its per-frame log-probabilities (25 Hz for the tiny model)
and the transcript's character ids give the best CTC path (Viterbi over the usual 2L+1 states:
blank, c1, blank, c2, …, blank; a state may repeat, step to the next state, or skip a blank
between two different characters). Each ASR frame belongs to the character whose state the path
is in, or — on a blank — to the character before it (leading blanks go to the first character),
so the durations of an utterance add up to its number of ASR frames. When the transcript needs
more frames than the audio has (CTC infeasible), the frames are spread evenly instead, and the
row is counted as a fallback.

Durations are returned in TTS frames (``frames_per_asr_frame`` 20 ms TTS frames per ASR frame).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mloc_dagster.core.data.features import FeatureSet, collate
from mloc_dagster.core.models.base import BaseModel
from mloc_dagster.core.models.ctc import CtcFamily
from mloc_dagster.core.models.families import load_base_model

_NEG = -1e30


def load_frame_asr(path, device: str | torch.device = "cpu") -> BaseModel:
    """The TTS track's aligner: a CTC model on the log-mel frames the TTS model speaks
    (``input_features``) whose per-frame outputs give character durations; a raw-waveform CTC model
    or a seq2seq one (Whisper) has no such frames and is refused by name. (The judge may be any
    family: it hears waveforms.)"""
    bm = load_base_model(path, device)
    if not isinstance(bm.family, CtcFamily) or bm.model.main_input_name != "input_features":
        raise ValueError(f"the TTS aligner reads log-mel frames and CTC outputs per frame; {path} is a "
                         f"{bm.model.config.model_type} model on {bm.model.main_input_name}: use the built-in "
                         "or a Wav2Vec2BertForCTC base model (docs/models.md)")
    return bm


def ctc_viterbi(log_probs: np.ndarray, labels: Sequence[int], blank: int = 0) -> np.ndarray | None:
    """Per-frame index of the label each frame is assigned to (see module docstring), or None
    when no CTC path fits. ``log_probs`` [T, V]."""
    t_len, n = len(log_probs), len(labels)
    if n == 0:
        return None
    states = np.full(2 * n + 1, blank, dtype=np.int64)
    states[1::2] = labels
    s_len = len(states)
    emit = log_probs[:, states]  # [T, S]
    can_skip = np.zeros(s_len, dtype=bool)
    can_skip[3::2] = np.asarray(labels[1:]) != np.asarray(labels[:-1])
    score = np.full(s_len, _NEG)
    score[0], score[1] = emit[0, 0], emit[0, 1]
    back = np.zeros((t_len, s_len), dtype=np.int8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, t_len):
        prev1 = np.concatenate([[_NEG], score[:-1]])
        prev2 = np.where(can_skip, np.concatenate([[_NEG, _NEG], score[:-2]]), _NEG)
        cand = np.stack([score, prev1, prev2])
        back[t] = cand.argmax(0)
        score = cand.max(0) + emit[t]
    end = s_len - 1 if score[-1] >= score[-2] else s_len - 2
    if score[end] <= _NEG / 2:
        return None
    path = np.empty(t_len, dtype=np.int64)
    s = end
    for t in range(t_len - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    # state s → label index: (s - 1) // 2 for characters, blanks to the character before (≥ 0)
    return np.maximum((path - 1) // 2, 0)


def durations_from_path(label_of_frame: np.ndarray, n_labels: int) -> np.ndarray:
    return np.bincount(label_of_frame, minlength=n_labels).astype(np.int64)


def even_durations(frames: int, n_labels: int) -> np.ndarray:
    """``frames`` spread as evenly as possible over ``n_labels`` (the fallback)."""
    edges = np.linspace(0, frames, n_labels + 1).round().astype(np.int64)
    return np.diff(edges)


@torch.inference_mode()
def align_durations(asr: BaseModel, fs: FeatureSet, labels: Sequence[Sequence[int]], frames_per_asr_frame: int = 2,
                    batch_size: int = 32) -> tuple[list[np.ndarray], int]:
    """Durations (in TTS frames) of every character of every row of ``fs``, and the number of rows
    that fell back to even durations. ``labels`` are the ASR tokenizer's ids of the transcripts."""
    model = asr.model
    model.eval()
    out: list[np.ndarray | None] = [None] * len(fs)
    fallbacks = 0
    for start in range(0, len(fs), batch_size):
        idx = list(range(start, min(len(fs), start + batch_size)))
        batch = collate([fs.item(i) for i in idx])
        logits = model(input_features=batch["input_features"], attention_mask=batch["attention_mask"]).logits
        lengths = CtcFamily.output_lengths(model, batch["attention_mask"]).tolist()
        log_probs = torch.log_softmax(logits.float(), -1).numpy()
        for row, i in enumerate(idx):
            n_frames = int(lengths[row])
            path = ctc_viterbi(log_probs[row, :n_frames], labels[i], asr.tokenizer.blank_id)
            if path is None:
                fallbacks += 1
                d = even_durations(n_frames, len(labels[i]))
            else:
                d = durations_from_path(path, len(labels[i]))
            out[i] = d * frames_per_asr_frame
    return out, fallbacks  # type: ignore[return-value]
