"""The Whisper family: LoRA on an encoder-decoder model, teacher-forced training, ``generate`` decoding.

Labels are Whisper's own token sequence: ``<|startoftranscript|>`` ``<|lang|>`` ``<|transcribe|>``
``<|notimestamps|>`` (the prefix; language and task tokens only on a multilingual checkpoint), the
transcript's tokens, ``<|endoftext|>``. Training feeds the sequence without its last token to the
decoder and scores the next token at every position after the prefix (the prefix is given at
decoding time, never predicted). The language is the dialect's (``core/data/text.py:
language_for``), refused when the checkpoint has no token for it.

Features are the checkpoint's ``WhisperFeatureExtractor`` log-mel frames, cached unpadded like every
family's (``core/data/features.py``); the encoder reads a fixed window (30 s on the real models), so
a batch is padded back to it here with exactly the value the extractor gives silence: the extractor
clamps each utterance's log-mel at its maximum - 8 (log10) before scaling by (x + 4) / 4, and its
zero padding lies below that floor, so the padded frames are max(row max - 2, -1.5) in the scaled
values (a test compares with the extractor's own padded output).

Decoding is ``model.generate`` with the checkpoint's generation config (``num_beams`` there: greedy
by default), told the language and task, with at most ``TOKENS_PER_S`` tokens per second of audio.
Hypotheses are normalized like references (lower case, no punctuation) before CER/WER.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer

from mloc_dagster.core.data.text import language_for, normalize_transcript
from mloc_dagster.core.models.base import BaseModel, ModelOutput, quiet_progress_bars, quiet_transformers, unwrap

TOKENS_PER_S = 12  # a decoding cap well above speech (~3-5 Whisper tokens per second)
FRAMES_PER_S = 100  # the extractor's 10 ms hop


class WhisperFamily:
    name = "whisper"

    def __init__(self, model: nn.Module, tokenizer, feature_extractor):
        gc, config = model.generation_config, model.config
        self.tokenizer = tokenizer
        self.window = 2 * config.max_source_positions  # input frames the encoder reads (conv stride 2)
        if getattr(feature_extractor, "nb_max_frames", self.window) != self.window:
            raise ValueError(f"the feature extractor's window ({feature_extractor.nb_max_frames} frames) is not "
                             f"the encoder's ({self.window} = 2 × max_source_positions)")
        self.multilingual = bool(getattr(gc, "is_multilingual", False))
        self.lang_to_id = dict(getattr(gc, "lang_to_id", None) or {})
        if self.multilingual and not (self.lang_to_id and getattr(gc, "task_to_id", None)):
            raise ValueError("a multilingual Whisper checkpoint needs lang_to_id and task_to_id in its "
                             "generation_config.json")
        self.start = gc.decoder_start_token_id
        self.transcribe = gc.task_to_id["transcribe"] if self.multilingual else None
        self.no_timestamps = gc.no_timestamps_token_id
        self.eos, self.pad = gc.eos_token_id, config.pad_token_id
        self.max_tokens = config.max_target_positions
        self.given = 4 if self.multilingual else 2  # prefix tokens: start, (language, task,) no-timestamps

    def language_token(self, dialect: str | None) -> int | None:
        if not self.multilingual:
            return None
        if dialect is None:
            raise ValueError("a multilingual Whisper model needs the dialect of what it reads")
        token = f"<|{language_for(dialect)}|>"
        if token not in self.lang_to_id:
            raise ValueError(f"dialect {dialect!r}: the checkpoint has no language token {token} (the dialect "
                             f"key's first subtag); it has {', '.join(sorted(self.lang_to_id)[:12])}, ...")
        return self.lang_to_id[token]

    def prefix(self, dialect: str | None) -> list[int]:
        lang = self.language_token(dialect)
        return [self.start, *([lang, self.transcribe] if lang is not None else []), self.no_timestamps]

    def labels(self, text: str, dialect: str | None = None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return [*self.prefix(dialect), *ids, self.eos][:self.max_tokens + 1]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool = True) -> ModelOutput:
        seq = batch["labels"]  # prefix + text + eos per row, -100 after
        decoder_in = seq[:, :-1].masked_fill(seq[:, :-1] < 0, self.pad)
        target = seq[:, 1:].clone()
        target[:, :self.given - 1] = -100  # the prefix is given, not predicted
        out = model(input_features=self.encoder_inputs(batch["input_features"], batch["attention_mask"]),
                    decoder_input_ids=decoder_in, labels=target if with_loss else None)
        return ModelOutput(out.loss, out.logits, target >= 0)

    @torch.inference_mode()
    def decode(self, model: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor,
               dialect: str | None = None) -> list[str]:
        lang = self.language_token(dialect)
        seconds = float(attention_mask.sum(-1).max()) / FRAMES_PER_S
        budget = min(math.ceil(seconds * TOKENS_PER_S) + 8, self.max_tokens - len(self.prefix(dialect)))
        told = {"language": self.tokenizer.convert_ids_to_tokens(lang), "task": "transcribe"} if lang else {}
        with quiet_transformers():
            ids = unwrap(model).generate(input_features=self.encoder_inputs(features, attention_mask),
                                         max_new_tokens=budget, **told)
        return [normalize_transcript(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def encoder_inputs(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cached rows [B, T, 80] → the encoder's [B, 80, window], padded as the extractor pads."""
        valid = attention_mask.bool()[:, None, :]
        x = features.transpose(1, 2)
        row_max = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2))
        floor = torch.clamp(row_max - 2.0, min=-1.5)[:, None, None]
        x = torch.where(valid, x, floor)
        if x.shape[-1] < self.window:
            x = torch.cat([x, floor.expand(-1, x.shape[1], self.window - x.shape[-1])], dim=-1)
        return x[..., :self.window].contiguous()


def load_whisper(path: Path) -> BaseModel:
    """A ``WhisperForConditionalGeneration`` directory with its tokenizer, feature extractor and
    generation config."""
    with quiet_progress_bars():
        model = AutoModelForSpeechSeq2Seq.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    fe = AutoFeatureExtractor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return BaseModel(model, tokenizer, fe, path, WhisperFamily(model, tokenizer, fe))
