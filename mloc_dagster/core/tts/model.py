"""The tiny TTS model: a real ``FastSpeech2ConformerModel`` built from a config, never downloaded.

::

    characters (the base ASR's vocabulary, ``|`` between words)
      → Conformer encoder (2 blocks, 64 wide) → duration / pitch / energy predictors
      → length regulator (each character repeated for its duration, in 20 ms frames)
      → Conformer decoder (2 blocks) → Linear → 160-dim frames (no postnet)

About 0.44 M parameters; no macaron feed-forward and no postnet: on 2 shared CPU cores they
doubled the step time (0.54 → 0.29 s per batch of 16) for a model this small.

The frames are the ASR front end's log-mel (``core/tts/acoustics.py``), standardized per dimension
with the base dialect's mean and standard deviation (``tts.json``; adapters keep the base's
statistics so the LoRA learns the dialect's difference, not a new scale). Non-autoregressive, so
a training step is one parallel forward pass: it trains on 2 CPU cores in minutes, where
SpeechT5's autoregressive decoder would need its attention to be learned first.

A TTS model is a directory: ``config.json`` + ``model.safetensors`` (HF), ``vocab.json`` (the
character vocabulary, shared with the ASR so the judge scores the same characters) and
``tts.json`` (frame/pitch/energy statistics, the aligner's hash, training metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import FastSpeech2ConformerConfig, FastSpeech2ConformerModel

from mloc_dagster.core.models.base import own_memory, quiet_progress_bars
from mloc_dagster.core.models.ctc import CharTokenizer
from mloc_dagster.core.training.checkpoint import write_dir_atomically
from mloc_dagster.core.tts.acoustics import FRAME_DIM

TTS_FILE = "tts.json"
TTS_FORMAT = 1
# LoRA targets: every attention projection of encoder and decoder, and the frame projection.
DEFAULT_TTS_LORA_TARGETS = ("linear_q", "linear_k", "linear_v", "linear_out", "feat_out")

TINY_CONFIG = dict(
    hidden_size=64, num_mel_bins=FRAME_DIM, encoder_layers=2, decoder_layers=2,
    encoder_num_attention_heads=2, decoder_num_attention_heads=2, use_macaron_style_in_conformer=False,
    encoder_linear_units=128, decoder_linear_units=128, encoder_kernel_size=7, decoder_kernel_size=7,
    speech_decoder_postnet_layers=0,
    duration_predictor_channels=64, pitch_predictor_channels=64, pitch_predictor_layers=2,
    energy_predictor_channels=64, energy_predictor_layers=2,
    encoder_dropout_rate=0.1, encoder_positional_dropout_rate=0.1, encoder_attention_dropout_rate=0.1,
    decoder_dropout_rate=0.1, decoder_positional_dropout_rate=0.1, decoder_attention_dropout_rate=0.1,
    duration_predictor_dropout_rate=0.1, pitch_predictor_dropout=0.2, energy_predictor_dropout=0.2,
    max_source_positions=2000,
)


@dataclass
class TtsStats:
    """Standardization of frames (per dimension), token pitch and token energy."""

    frame_mean: list[float]
    frame_std: list[float]
    pitch_mean: float = 0.0
    pitch_std: float = 1.0
    energy_mean: float = 0.0
    energy_std: float = 1.0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.frame_mean), torch.tensor(self.frame_std)


@dataclass
class TtsModel:
    model: FastSpeech2ConformerModel
    tokenizer: CharTokenizer
    stats: TtsStats
    path: Path | None = None
    info: dict = field(default_factory=dict)  # tts.json's other keys (aligner hash, training metrics)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def new_tiny_tts(tokenizer: CharTokenizer, stats: TtsStats, **overrides) -> TtsModel:
    """A fresh tiny FastSpeech2Conformer over the tokenizer's characters (padding id = its blank)."""
    config = FastSpeech2ConformerConfig(**(TINY_CONFIG | {"vocab_size": tokenizer.vocab_size} | overrides))
    return TtsModel(FastSpeech2ConformerModel(config), tokenizer, stats)


def save_tts_model(tm: TtsModel, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write the model directory atomically (temp dir, fsync, rename)."""
    out = Path(out_dir)
    meta = {"format": TTS_FORMAT, "stats": tm.stats.__dict__} | (info if info is not None else tm.info)

    def write(tmp: Path) -> None:
        with quiet_progress_bars():
            tm.model.save_pretrained(tmp)
        tm.tokenizer.save_pretrained(tmp)
        (tmp / TTS_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")

    write_dir_atomically(out, write)
    return out


def is_tts_model_dir(path: str | Path) -> bool:
    return (Path(path) / TTS_FILE).is_file()


def load_tts_model(path: str | Path, device: str = "cpu") -> TtsModel:
    """Load a TTS model directory in eval mode, never touching the network."""
    path = Path(path)
    if not is_tts_model_dir(path):
        raise FileNotFoundError(f"{path} is not a TTS model directory (no {TTS_FILE})")
    meta = json.loads((path / TTS_FILE).read_text())
    if meta.get("format") != TTS_FORMAT:
        raise ValueError(f"{path}: {TTS_FILE} format {meta.get('format')!r} != {TTS_FORMAT}")
    with quiet_progress_bars():
        model = FastSpeech2ConformerModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    own_memory(model)
    model.to(device).eval()
    tokenizer = CharTokenizer.from_pretrained(path, blank_id=0)
    stats = TtsStats(**meta.pop("stats"))
    meta.pop("format")
    return TtsModel(model, tokenizer, stats, path, meta)
