"""What every base model family shares: the loaded ``BaseModel``, the ``Family`` interface that
training, evaluation and the TTS judge call, and the helpers around loading.

A family (``core/models/families.py`` lists them) is one object per loaded base model. It turns a
transcript into the label ids its model trains on, runs the model on a padded batch (loss, logits
and which logit positions count), and decodes a batch of features into text. Nothing outside the
family objects asks which family a model is.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [B, N, V]: per output frame (CTC) or per decoder position (seq2seq)
    mask: torch.Tensor  # [B, N] bool: the positions that count (distillation averages over them)


class Family(Protocol):
    """What the line calls on a base model, whatever its family. ``dialect`` is the dialect of the
    rows (a seq2seq model conditions on its language; a CTC model ignores it)."""

    name: str  # the checkpoint's model_type

    def labels(self, text: str, dialect: str | None = None) -> list[int]: ...

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool = True) -> ModelOutput: ...

    def decode(self, model: nn.Module, features: torch.Tensor, attention_mask: torch.Tensor,
               dialect: str | None = None) -> list[str]: ...


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: object  # the family's tokenizer (CharTokenizer for CTC, the checkpoint's own for Whisper)
    feature_extractor: object  # the checkpoint's feature extractor (what the feature cache is keyed on)
    path: Path | None
    family: Family

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def is_tiny(self) -> bool:
        from mloc_dagster.core.models.ctc import MODEL_TYPE

        return getattr(self.model.config, "model_type", "") == MODEL_TYPE


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_lora_targets(model: nn.Module) -> list[str]:
    """LoRA target modules for a base model: the tiny model names its own; for HF checkpoints the
    usual attention projections that exist in it (Whisper: q_proj/v_proj of the encoder's and the
    decoder's self- and cross-attention)."""
    config = getattr(model, "config", None)
    if getattr(config, "lora_target_modules", None):
        return list(config.lora_target_modules)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (("linear_q", "linear_v"), ("q_proj", "v_proj"), ("query", "value")):
        if set(pair) <= linear_names:
            return list(pair)
    raise ValueError("cannot guess LoRA target modules for this model; set target_modules "
                     f"(linear layers present: {sorted(linear_names)[:20]})")


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers draws tqdm bars on every save/load; they only clutter job logs."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' advice on every ``generate`` call (deprecations, attention-mask hints about
    Whisper's fixed window) only clutters job logs: errors still show."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def own_memory(model: nn.Module) -> None:
    """Copy weights out of the memory-mapped checkpoint into fresh, aligned allocations.

    transformers may hand back tensors that view the mmapped safetensors file at whatever offset
    its header leaves; SIMD kernels then take different code paths than on aligned memory, and
    results differ in the last bits from a model built in memory. Owning the memory makes the
    numbers independent of the file layout (exact resume relies on it) and of later changes to
    the file."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)
