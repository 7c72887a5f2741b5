"""Tiny checkpoints of other model families, built from their configs and saved exactly as a Hub
checkpoint is (``config.json`` + ``model.safetensors``, ``vocab.json``, ``preprocessor_config.json``;
Whisper: ``tokenizer.json``, ``generation_config.json``): nothing can be downloaded here, and the code
paths are the same as for a real checkpoint.

The tiny Whisper is multilingual like the real ones: its byte-level BPE is trained offline with
``tokenizers`` on the demo corpus's sentences, followed by Whisper's special tokens in Whisper's
order (``<|endoftext|>``, ``<|startoftranscript|>``, the 99 language tokens, task tokens,
``<|notimestamps|>``), and its generation config carries ``lang_to_id`` / ``task_to_id`` as a Hub
checkpoint's does. Its encoder reads a 4 s window (the real ones: 30 s)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GenerationConfig,
    HubertConfig,
    HubertForCTC,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForCTC,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from mloc_dagster.core.data.corpus import make_sentences
from mloc_dagster.core.data.features import default_feature_extractor
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
    elif family == "wav2vec2-bert":  # w2v-BERT 2.0's architecture on the SeamlessM4T log-mel front end
        model = Wav2Vec2BertForCTC(Wav2Vec2BertConfig(
            vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.blank_id, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, feature_projection_input_dim=160,
            conv_depthwise_kernel_size=3, max_source_positions=512, layerdrop=0.0))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        default_feature_extractor().save_pretrained(out)
        return out
    elif family == "wav2vec2-no-head":
        model = Wav2Vec2Model(Wav2Vec2Config(**_SMALL))
    elif family == "whisper":
        return save_tiny_whisper(out, seed=seed)
    elif family == "bert":  # a text model: no family of the line
        model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
    else:
        raise ValueError(family)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)
    return out


WHISPER_WINDOW_S = 4


def save_tiny_whisper(out: Path, multilingual: bool = True, seed: int = 0) -> Path:
    """A tiny ``WhisperForConditionalGeneration`` checkpoint with its tokenizer, feature extractor and
    generation config, as on the Hub."""
    torch.manual_seed(seed)
    tokenizer = _whisper_tokenizer(multilingual)
    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    window = WHISPER_WINDOW_S * 100  # 10 ms frames
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=window // 2, max_target_positions=96, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=None, begin_suppress_tokens=None))
    langs = {f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES} if multilingual else {}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=96,
        is_multilingual=multilingual, lang_to_id=langs,
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")} if multilingual else {},
        no_timestamps_token_id=ids("<|notimestamps|>"), suppress_tokens=[], begin_suppress_tokens=[eot])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=WHISPER_WINDOW_S).save_pretrained(out)
    return out


def _whisper_tokenizer(multilingual: bool) -> WhisperTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(make_sentences(2000, seed=0), trainer)
    languages = [f"<|{c}|>" for c in LANGUAGES] if multilingual else []
    specials = ["<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tokenizer = WhisperTokenizer(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer
