"""The built-in tiny CTC model, the character tokenizer, and loading any local CTC base model.

``TinyCtcForCTC`` is a real transformers model (registered with ``AutoConfig`` and
``AutoModelForCTC`` under model type ``mloc-tiny-ctc``), so ``save_pretrained`` /
``AutoModelForCTC.from_pretrained`` and peft work on it like on any Hub model::

    input_features [B, T, 160] (50 Hz, SeamlessM4T log-mel, see core/data/features.py)
      → stack 2 frames (25 Hz, 320-dim)  → proj: Linear(320, 256) + LayerNorm
      → 3 × [ GRU(256, 128, bidirectional) → mix: Linear(256, 256) → + residual → LayerNorm ]
      → head: Linear(256, vocab)         → CTC (blank = pad_token_id = 0)

About 1.2 M parameters. Sequences are packed (``pack_padded_sequence``), so padding never leaks
into the backward GRU direction and a transcript does not depend on what else is in its batch.
LoRA (peft) supports ``nn.Linear`` but not ``nn.GRU``; the linear ``proj``, ``layers.N.mix`` and
``head`` are the adapter targets (``config.lora_target_modules``): ``proj`` re-maps the acoustic
front end, the ``mix`` layers re-map what every GRU layer hands to the next, which is where a
dialect's different vowels and rhythm need to be absorbed.

A base model is a directory: ``config.json`` + ``model.safetensors`` (HF), ``vocab.json`` (the
character vocabulary, the Wav2Vec2CTCTokenizer convention: ``<pad>`` is the CTC blank, ``|`` the
word delimiter) and ``preprocessor_config.json`` (the feature extractor). Any local CTC checkpoint
of a supported family (``core/models/families.py``: ``Wav2Vec2BertForCTC`` on log-mel
``input_features``, ``Wav2Vec2ForCTC`` / ``HubertForCTC`` on the raw waveform's ``input_values``
with their own feature extractor) loads the same way, and ``CtcFamily`` trains and decodes them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutput

from mloc_dagster.core.data.features import default_feature_extractor
from mloc_dagster.core.models.base import BaseModel, ModelOutput, quiet_progress_bars, unwrap

MODEL_TYPE = "mloc-tiny-ctc"
VOCAB_FILE = "vocab.json"
BLANK = "<pad>"
WORD_DELIMITER = "|"
DEFAULT_LORA_TARGETS = ("proj", "mix", "head")


# --------------------------------------------------------------------------- tokenizer


class CharTokenizer:
    """Characters ↔ ids for CTC. Id 0 is the blank; ``|`` stands for the space between words.

    Reads our ``vocab.json`` and the Wav2Vec2CTCTokenizer one alike (``<pad>`` blank, ``|``
    delimiter, optional ``<unk>``). Characters outside the vocabulary map to ``<unk>`` when the
    vocabulary has one and are dropped otherwise (the dataset's charset check makes that rare).
    """

    def __init__(self, vocab: dict[str, int], blank_token: str = BLANK, word_delimiter: str = WORD_DELIMITER,
                 unk_token: str = "<unk>"):
        self.vocab = dict(vocab)
        self.ids = {i: t for t, i in self.vocab.items()}
        if blank_token not in self.vocab:
            raise ValueError(f"vocabulary has no blank token {blank_token!r}")
        self.blank_token, self.word_delimiter, self.unk_token = blank_token, word_delimiter, unk_token
        self.blank_id = self.vocab[blank_token]
        self.unk_id = self.vocab.get(unk_token)
        self._special = {i for t, i in self.vocab.items() if len(t) > 1 and t.startswith("<")}

    @classmethod
    def english(cls) -> CharTokenizer:
        chars = [BLANK, WORD_DELIMITER, "'", *"abcdefghijklmnopqrstuvwxyz"]
        return cls({c: i for i, c in enumerate(chars)})

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        out = []
        for ch in text:
            tok = self.word_delimiter if ch == " " else ch
            i = self.vocab.get(tok, self.unk_id)
            if i is not None:
                out.append(i)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (already CTC-collapsed) → text: blanks and special tokens dropped, ``|`` → space."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.blank_id or i in self._special or i not in self.ids:
                continue
            tok = self.ids[i]
            chars.append(" " if tok == self.word_delimiter else tok)
        return " ".join("".join(chars).split())

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, VOCAB_FILE).write_text(json.dumps(self.vocab, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, blank_id: int | None = None) -> CharTokenizer:
        vocab = json.loads(Path(directory, VOCAB_FILE).read_text())
        if vocab and all(isinstance(v, dict) for v in vocab.values()):  # multilingual {lang: vocab}
            vocab = next(iter(vocab.values()))
        blank = BLANK
        if blank_id is not None:
            blank = next((t for t, i in vocab.items() if i == blank_id), BLANK)
        delim = WORD_DELIMITER if WORD_DELIMITER in vocab else " "
        return cls(vocab, blank_token=blank, word_delimiter=delim)


def greedy_ctc_decode(logits: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
                      blank_id: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks. ``logits`` [B, T, V]."""
    best = logits.argmax(-1).cpu()
    lengths = [best.shape[1]] * best.shape[0] if lengths is None else [int(n) for n in lengths]
    out = []
    for row, n in zip(best, lengths):
        seq = torch.unique_consecutive(row[:n])
        out.append([int(i) for i in seq if int(i) != blank_id])
    return out


# --------------------------------------------------------------------------- the tiny model


class TinyCtcConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 29, input_dim: int = 160, stack_frames: int = 2,
                 hidden_size: int = 256, gru_hidden_size: int = 128, num_layers: int = 3,
                 dropout: float = 0.1, pad_token_id: int = 0, ctc_loss_reduction: str = "mean",
                 ctc_zero_infinity: bool = True, lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
                 mel_bins: int = 80, mask_time_prob: float = 0.0, mask_time_length: int = 10,
                 mask_feature_count: int = 0, mask_feature_length: int = 10, **kwargs):
        self.vocab_size = vocab_size
        self.input_dim = input_dim
        self.stack_frames = stack_frames
        self.hidden_size = hidden_size
        self.gru_hidden_size = gru_hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.ctc_loss_reduction = ctc_loss_reduction
        self.ctc_zero_infinity = ctc_zero_infinity
        self.lora_target_modules = list(lora_target_modules)
        # SpecAugment (training mode only): ~mask_time_prob of the frames in spans of up to
        # mask_time_length input frames, and mask_feature_count bands of up to mask_feature_length
        # mel bins (the same bins in every stacked frame), set to 0 = the normalized mean.
        self.mel_bins = mel_bins
        self.mask_time_prob = mask_time_prob
        self.mask_time_length = mask_time_length
        self.mask_feature_count = mask_feature_count
        self.mask_feature_length = mask_feature_length
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class TinyCtcLayer(nn.Module):
    def __init__(self, config: TinyCtcConfig):
        super().__init__()
        self.gru = nn.GRU(config.hidden_size, config.gru_hidden_size, batch_first=True, bidirectional=True)
        self.mix = nn.Linear(2 * config.gru_hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: PackedSequence) -> PackedSequence:
        # Everything but the GRU is per frame, so it runs on the packed rows directly.
        h, _ = self.gru(x)
        data = self.norm(x.data + self.dropout(self.mix(h.data)))
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)


class TinyCtcPreTrainedModel(PreTrainedModel):
    config_class = TinyCtcConfig
    base_model_prefix = "tiny_ctc"
    main_input_name = "input_features"
    input_modalities = "audio"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            hf_init.xavier_uniform_(module.weight)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.GRU):
            for name, p in module.named_parameters():
                if name.startswith("weight_ih"):
                    hf_init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    hf_init.orthogonal_(p)
                else:
                    hf_init.zeros_(p)
        elif isinstance(module, nn.LayerNorm):
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)


class TinyCtcForCTC(TinyCtcPreTrainedModel):
    def __init__(self, config: TinyCtcConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.input_dim * config.stack_frames, config.hidden_size)
        self.proj_norm = nn.LayerNorm(config.hidden_size)
        self.layers = nn.ModuleList(TinyCtcLayer(config) for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _get_feat_extract_output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Frames of logits for ``input_lengths`` input frames (same name as the HF CTC models)."""
        return torch.clamp(input_lengths // self.config.stack_frames, min=1)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        batch, frames, dim = input_features.shape
        s = self.config.stack_frames
        if attention_mask is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=input_features.device)
        else:
            lengths = attention_mask.sum(-1).long()
        out_lengths = self._get_feat_extract_output_lengths(lengths)
        if self.training:
            input_features = self._spec_augment(input_features, lengths)
        t_out = max(1, frames // s)
        x = input_features[:, :t_out * s] if frames >= s else F.pad(input_features, (0, 0, 0, s - frames))
        x = x.reshape(batch, t_out, dim * s)

        packed = pack_padded_sequence(x, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
        data = self.dropout(self.proj_norm(self.proj(packed.data)))
        packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        for layer in self.layers:
            packed = layer(packed)
        hidden, _ = pad_packed_sequence(packed, batch_first=True, total_length=t_out)
        logits = self.head(self.dropout(hidden))

        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"label values must be < vocab_size {self.config.vocab_size}")
            label_mask = labels >= 0
            target_lengths = label_mask.sum(-1)
            targets = labels.masked_select(label_mask)
            log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
            with torch.backends.cudnn.flags(enabled=False):
                loss = F.ctc_loss(log_probs, targets, out_lengths, target_lengths,
                                  blank=self.config.pad_token_id, reduction=self.config.ctc_loss_reduction,
                                  zero_infinity=self.config.ctc_zero_infinity)
        return CausalLMOutput(loss=loss, logits=logits)

    def _spec_augment(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, frames, dim = x.shape
        keep = torch.ones(batch, frames, dim, dtype=torch.bool, device=x.device)
        if c.mask_time_prob > 0 and c.mask_time_length > 0:
            spans = max(1, round(c.mask_time_prob * frames / c.mask_time_length))
            start = (torch.rand(batch, spans, device=x.device) * lengths[:, None]).long()
            width = (torch.rand(batch, spans, device=x.device) * (c.mask_time_length + 1)).long()
            pos = torch.arange(frames, device=x.device)[None, None, :]
            hit = ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(1)
            keep &= ~hit[..., None]
        if c.mask_feature_count > 0 and c.mask_feature_length > 0 and dim % c.mel_bins == 0:
            start = (torch.rand(batch, c.mask_feature_count, device=x.device) * c.mel_bins).long()
            width = (torch.rand(batch, c.mask_feature_count, device=x.device) * (c.mask_feature_length + 1)).long()
            pos = (torch.arange(dim, device=x.device) % c.mel_bins)[None, None, :]
            hit = ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(1)
            keep &= ~hit[:, None, :]
        return x * keep


AutoConfig.register(MODEL_TYPE, TinyCtcConfig, exist_ok=True)
AutoModelForCTC.register(TinyCtcConfig, TinyCtcForCTC, exist_ok=True)


# --------------------------------------------------------------------------- the CTC family


class CtcFamily:
    """CTC base models (``core/models/families.py``: the tiny model, w2v-BERT, wav2vec2/MMS/XLS-R,
    HuBERT): character labels, the model's CTC loss, greedy best-path decoding. The model's own
    ``main_input_name`` says what it reads: log-mel rows [B, T, D] as ``input_features``, waveform
    rows [B, T, 1] as ``input_values`` [B, T]."""

    def __init__(self, name: str, tokenizer: CharTokenizer):
        self.name, self.tokenizer = name, tokenizer

    def labels(self, text: str, dialect: str | None = None) -> list[int]:
        return self.tokenizer.encode(text)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool = True) -> ModelOutput:
        mask = batch["attention_mask"]
        out = model(**self.inputs(model, batch["input_features"], mask),
                    **({"labels": batch["labels"]} if with_loss else {}))
        frames = torch.arange(out.logits.shape[1], device=out.logits.device)[None, :]
        return ModelOutput(out.loss, out.logits, frames < self.output_lengths(model, mask)[:, None])

    def decode(self, model: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor,
               dialect: str | None = None) -> list[str]:
        logits = model(**self.inputs(model, features, attention_mask)).logits
        best = greedy_ctc_decode(logits, self.output_lengths(model, attention_mask), self.tokenizer.blank_id)
        return [self.tokenizer.decode(ids) for ids in best]

    @staticmethod
    def inputs(model: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        name = unwrap(model).main_input_name
        return {name: features.squeeze(-1) if name == "input_values" else features, "attention_mask": attention_mask}

    @staticmethod
    def output_lengths(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logit frames per row (the HF CTC models' ``_get_feat_extract_output_lengths``)."""
        lengths = attention_mask.sum(-1)
        fn = getattr(unwrap(model), "_get_feat_extract_output_lengths", None)
        return fn(lengths).long() if fn is not None else lengths.long()


def load_ctc(path: Path) -> BaseModel:
    """A CTC base model directory: the model (``AutoModelForCTC``), ``vocab.json`` and the checkpoint's
    feature extractor (the w2v-BERT front end when it has none)."""
    with quiet_progress_bars():
        model = AutoModelForCTC.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    # Every family trains on one loss: CTC averaged over target lengths, impossible alignments zeroed
    # (a checkpoint's own default may sum, which would change what a learning rate means).
    model.config.ctc_loss_reduction, model.config.ctc_zero_infinity = "mean", True
    # transformers' SpecAugment for wav2vec2-style models draws from numpy's global RNG, which no
    # checkpoint restores: off, so a resumed job repeats the uninterrupted one exactly.
    if getattr(model.config, "apply_spec_augment", False):
        model.config.apply_spec_augment = False
    if not (path / VOCAB_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {VOCAB_FILE}: a CTC base model needs its character vocabulary")
    tokenizer = CharTokenizer.from_pretrained(path, blank_id=getattr(model.config, "pad_token_id", None))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{VOCAB_FILE} has {tokenizer.vocab_size} ids but the model head has "
                         f"{model.config.vocab_size}")
    if (path / "preprocessor_config.json").is_file():
        fe = AutoFeatureExtractor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    else:
        fe = default_feature_extractor()
    return BaseModel(model, tokenizer, fe, path, CtcFamily(model.config.model_type, tokenizer))


def new_tiny_model(tokenizer: CharTokenizer | None = None, **config_kwargs) -> BaseModel:
    tokenizer = tokenizer or CharTokenizer.english()
    fe = default_feature_extractor()
    config = TinyCtcConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.blank_id,
                           input_dim=fe.num_mel_bins * fe.stride, **config_kwargs)
    return BaseModel(TinyCtcForCTC(config), tokenizer, fe, None, CtcFamily(MODEL_TYPE, tokenizer))
