"""The TTS model's acoustic frames, the Griffin-Lim vocoder, and mel-cepstral distortion.

**Frames.** The TTS predicts exactly the log-mel the ASR front end computes (``core/data/features.py``:
the w2v-BERT / SeamlessM4T Kaldi-style fbank, 80 bins every 10 ms, natural log of mel power),
*before* the ASR's per-utterance normalization, two 10 ms frames stacked into one 160-dim frame
every 20 ms (the ASR's 50 Hz input rate). Keeping the absolute level makes the frames invertible
to audio; ``asr_features`` applies the ASR's normalization when a caller wants to feed them to
the ASR directly.

**Vocoder.** ``griffin_lim`` turns frames into a 16 kHz waveform with no trained weights: mel
power → linear power by non-negative least squares against the extractor's own mel filters, then
``librosa.griffinlim`` with the extractor's STFT (512-point FFT, 400-sample Povey window, hop 160),
then the inverse of Kaldi's 0.97 pre-emphasis. Deterministic (``init=None`` starts from zero phase).

**MCD.** ``mel_cepstral_distortion`` compares two recordings of one sentence: cepstra (DCT-II of the
80 log-mel amplitudes, coefficients 1..13, c0 — loudness — left out), aligned by DTW (``librosa.sequence.dtw``,
Euclidean cost), MCD = 10/ln 10 · sqrt(2 · Σ Δc²) averaged over the path, in dB.
"""

from __future__ import annotations

from collections.abc import Sequence

import librosa
import numpy as np
import scipy.fft
import scipy.signal

from mloc_dagster.core.data.features import default_feature_extractor

STACK = 2  # 10 ms frames per TTS frame (the ASR extractor's stride)
MEL_BINS = 80
FRAME_DIM = STACK * MEL_BINS
PREEMPHASIS = 0.97
INT16_SCALE = 2**15  # the extractor scales audio to 16-bit integer range (Kaldi compliance)

_FE = default_feature_extractor()


def log_mel(audio: np.ndarray) -> np.ndarray:
    """[T10, 80] un-normalized log-mel of a 16 kHz waveform, as the ASR extractor computes it."""
    return np.asarray(_FE._extract_fbank_features(np.asarray(audio, dtype=np.float32)), dtype=np.float32)


def stack_frames(mel: np.ndarray) -> np.ndarray:
    """[T10, 80] → [T10 // 2, 160]: pairs of 10 ms frames (an odd last frame is dropped, as the ASR does)."""
    t = (len(mel) // STACK) * STACK
    return np.ascontiguousarray(mel[:t].reshape(t // STACK, FRAME_DIM))


def unstack_frames(frames: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(frames, dtype=np.float32).reshape(-1, MEL_BINS))


def tts_frames(audio: np.ndarray) -> np.ndarray:
    """[T50, 160] TTS target frames of a waveform."""
    return stack_frames(log_mel(audio))


def asr_features(frames: np.ndarray) -> np.ndarray:
    """The ASR's ``input_features`` for TTS frames: per-utterance, per-mel-bin mean/variance
    normalization of the 10 ms frames (as ``SeamlessM4TFeatureExtractor`` does), stacked again."""
    mel = unstack_frames(frames)
    mel = (mel - mel.mean(0, keepdims=True)) / np.sqrt(mel.var(0, ddof=1, keepdims=True) + 1e-7)
    return stack_frames(mel)


def _povey_window() -> np.ndarray:
    return np.asarray(_FE.window, dtype=np.float64)


def mel_to_linear_power(filters: np.ndarray, mel_power: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Non-negative ``P`` [257, T] with ``filters @ P ≈ mel_power``: the pseudo-inverse, clipped
    at a small floor, refined by Lee–Seung multiplicative updates (which keep ``P ≥ 0``). Orders of
    magnitude faster than ``librosa.util.nnls`` on power values of int16-scaled audio (measured:
    82 s for one 2 s utterance there)."""
    floor = 1e-10 * float(mel_power.max(initial=1.0))
    power = np.maximum(np.linalg.pinv(filters) @ mel_power, floor)
    numerator = filters.T @ mel_power
    gram = filters.T @ filters
    for _ in range(iterations):
        power *= numerator / (gram @ power + floor)
    return power


def griffin_lim(frames: np.ndarray, n_iter: int = 32) -> np.ndarray:
    """16 kHz float32 waveform for [T50, 160] TTS frames (see the module docstring)."""
    mel_power = np.exp(unstack_frames(frames).astype(np.float64)).T  # [80, T10]
    filters = np.asarray(_FE.mel_filters, dtype=np.float64).T  # [80, 257]
    power = mel_to_linear_power(filters, mel_power)
    magnitude = np.sqrt(np.maximum(power, 0.0))
    audio = librosa.griffinlim(magnitude, n_iter=n_iter, hop_length=160, win_length=400, n_fft=512,
                               window=_povey_window(), center=False, init=None)
    audio = scipy.signal.lfilter([1.0], [1.0, -PREEMPHASIS], audio)
    audio = audio / INT16_SCALE
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak > 0.99:  # keep it a valid float waveform; the ASR normalizes level away anyway
        audio = audio * (0.99 / peak)
    return audio.astype(np.float32)


def cepstra(audio: np.ndarray, n: int = 13) -> np.ndarray:
    """[T10, n] mel cepstra c1..cn of a waveform: DCT-II (orthonormal) of the log mel *amplitude*
    (half the extractor's log power), the scale the MCD constant assumes."""
    return scipy.fft.dct(0.5 * log_mel(audio), type=2, axis=1, norm="ortho")[:, 1:n + 1]


def mel_cepstral_distortion(synth: np.ndarray, real: np.ndarray) -> float:
    """MCD in dB between two waveforms of the same sentence, after DTW alignment."""
    a, b = cepstra(synth), cepstra(real)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    _, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean")
    diff = a[path[:, 0]] - b[path[:, 1]]
    return float(np.mean(10.0 / np.log(10.0) * np.sqrt(2.0 * np.sum(diff**2, axis=1))))


def mean_mcd(synth: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> float:
    """Mean MCD over pairs (synthesized, real recording) of the same sentences."""
    if len(synth) != len(real):
        raise ValueError(f"{len(synth)} synthesized vs {len(real)} real recordings")
    values = [mel_cepstral_distortion(s, r) for s, r in zip(synth, real)]
    return float(np.nanmean(values)) if values else float("nan")


