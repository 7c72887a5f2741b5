"""Decoding contributor audio into 16 kHz mono float32, and back to compact PCM for shards."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000


class AudioError(ValueError):
    pass


def probe_duration(data: bytes) -> float:
    """Duration from the header alone, so a 10-minute file is refused without decoding it."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # soundfile raises several types for garbage input
        raise AudioError(f"cannot decode audio: {exc}") from exc
    if info.samplerate <= 0 or info.frames <= 0:
        raise AudioError("audio has no frames")
    return info.frames / info.samplerate


def decode_to_16k_mono(data: bytes) -> np.ndarray:
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"cannot decode audio: {exc}") from exc
    mono = audio.mean(axis=1)
    if sr != TARGET_SR:
        mono = soxr.resample(mono, sr, TARGET_SR).astype(np.float32)
    if not np.isfinite(mono).all():
        raise AudioError("audio contains non-finite samples")
    return mono


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0
