"""Tiny checkpoints of other model families, built from their configs and saved exactly as a Hub
checkpoint is (``config.json`` + ``model.safetensors``, ``vocab.json``, ``preprocessor_config.json``):
nothing can be downloaded here, and the code paths are the same as for a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    HubertConfig,
    HubertForCTC,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from mloc_dagster.core.models.ctc import CharTokenizer

# A 320-sample hop (50 Hz) as the real models have, in 4 convolutions instead of 7.
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 8, 8),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
              do_stable_layer_norm=True, layerdrop=0.0, mask_time_prob=0.05)
WAVEFORM_FAMILIES = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2ForCTC), "hubert": (HubertConfig, HubertForCTC)}


def save_tiny_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialized tiny ``family`` checkpoint at ``out`` (the same for a seed)."""
    torch.manual_seed(seed)
    tokenizer = CharTokenizer.english()
    if family in WAVEFORM_FAMILIES:
        config_cls, model_cls = WAVEFORM_FAMILIES[family]
        model = model_cls(config_cls(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.blank_id, **_SMALL))
    elif family == "wav2vec2-no-head":
        model = Wav2Vec2Model(Wav2Vec2Config(**_SMALL))
    elif family == "whisper":
        model = WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
            max_source_positions=64, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[]))
    else:
        raise ValueError(family)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)
    return out
