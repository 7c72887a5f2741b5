"""The base model families a base model directory may hold, detected from its ``config.json``, and
loading, saving and checking base model directories.

Each family is a row of ``FAMILIES``: the checkpoint's ``model_type``, the head its
``architectures`` must name, and its loader, which returns a ``BaseModel`` whose ``family`` object
(``core/models/base.py: Family``) is what training, evaluation and the TTS judge call. Everything is
loaded from local files only, never with remote code. Anything else is refused when it is loaded
(registration included) with this list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mloc_dagster.core.models.base import BaseModel, own_memory, quiet_progress_bars
from mloc_dagster.core.models.ctc import MODEL_TYPE, load_ctc
from mloc_dagster.core.models.whisper import load_whisper
from mloc_dagster.core.publish import publish_dir


@dataclass(frozen=True)
class FamilyRow:
    description: str
    head: str  # what one of the checkpoint's ``architectures`` must end with
    load: Callable[[Path], BaseModel]


FAMILIES = {
    MODEL_TYPE: FamilyRow("the built-in tiny CTC model (log-mel input_features)", "ForCTC", load_ctc),
    "wav2vec2-bert": FamilyRow("Wav2Vec2BertForCTC (log-mel input_features, e.g. w2v-BERT 2.0)", "ForCTC", load_ctc),
    "wav2vec2": FamilyRow("Wav2Vec2ForCTC (raw waveform input_values: wav2vec2, XLS-R, MMS)", "ForCTC", load_ctc),
    "hubert": FamilyRow("HubertForCTC (raw waveform input_values)", "ForCTC", load_ctc),
    "whisper": FamilyRow("WhisperForConditionalGeneration (encoder-decoder on log-mel input_features)",
                         "ForConditionalGeneration", load_whisper),
}


class UnsupportedModel(ValueError):
    """A directory that is not a base model of a supported family; the message lists them."""


def check_family(path: Path) -> str:
    """The family (``model_type``) of the base model directory ``path``: a supported one whose
    ``architectures`` name the family's head, or ``UnsupportedModel``."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    supported = "; ".join(f"{k}: {v.description}" for k, v in FAMILIES.items())
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"{path}: model_type {model_type!r} ({', '.join(architectures) or 'no architectures'})"
                               f" is not a supported base model family. Supported: {supported}")
    head = FAMILIES[model_type].head
    if model_type != MODEL_TYPE and not any(a.endswith(head) for a in architectures):
        raise UnsupportedModel(f"{path}: a {model_type} checkpoint without its *{head} head (architectures "
                               f"{architectures}). Supported: {supported}")
    return model_type


def load_base_model(path: str | Path, device: str | torch.device = "cpu") -> BaseModel:
    """Load a base model directory of a supported family (``FAMILIES``) in eval mode, never
    touching the network."""
    path = Path(path)
    bm = FAMILIES[check_family(path)].load(path)
    own_memory(bm.model)
    bm.model.to(device).eval()
    return bm


def save_base_model(bm: BaseModel, out_dir: str | Path, extra: dict[str, object] | None = None) -> Path:
    """Write model + tokenizer + feature extractor config, published atomically (``core/publish.py``);
    an existing ``out_dir`` is replaced."""

    def write(tmp: Path) -> None:
        with quiet_progress_bars():
            bm.model.save_pretrained(tmp)
        bm.tokenizer.save_pretrained(tmp)
        bm.feature_extractor.save_pretrained(tmp)
        if extra is not None:
            (tmp / "training.json").write_text(json.dumps(extra, indent=1, sort_keys=True, default=str) + "\n")

    return publish_dir(out_dir, write, replace=True)
