"""A LoRA adapter in memory: read from a validated directory, its ΔW, written back.

What a node may hand in, and every check on it, is ``core/adapters/format.py``; ``load_adapter``
validates a directory there (in place) and keeps what it read. A refused adapter raises
``InvalidAdapter`` (``load_adapter``) or is reported as a ``Rejection`` (``load_adapters``);
nothing is ever deleted.

``save_adapter`` writes what peft's ``save_pretrained`` writes, atomically, checked by the same
rules first, so ``PeftModel.from_pretrained(base, out_dir)`` loads it and we never write what we
would refuse. Combining adapters is ``core/merging/merge.py``; screening them against a trusted
reference is ``core/merging/screening.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mloc_dagster.core.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    InvalidAdapter,
    ModuleShapes,
    check_lora_tensors,
    read_adapter_dir,
    validate_adapter_config,
)
from mloc_dagster.core.publish import publish_dir

__all__ = [
    "Adapter",
    "ClipEvent",
    "Rejection",
    "adapter_sha256",
    "delta_weights",
    "load_adapter",
    "load_adapters",
    "lora_scale",
    "save_adapter",
]


def lora_scale(config: Mapping[str, Any]) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return float(config["lora_alpha"]) / (math.sqrt(r) if config.get("use_rslora") else r)


# --------------------------------------------------------------------------------------------
# Adapters


class _LoraWeights(Protocol):
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict[str, Any]

    def delta(self, module: str, dtype: torch.dtype = ...) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class Adapter:
    """A validated LoRA adapter: per module, A (r × in) and B (out × r)."""

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None  # of adapter_model.safetensors, as stored with the job
    label: str | None = None  # how reports name it; defaults to the path
    result: Mapping[str, Any] = field(default_factory=dict)  # the job's result.json next to it ({}: none)

    @property
    def source(self) -> str:
        return self.label or (str(self.path) if self.path is not None else "<in memory>")

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        return lora_scale(self.config)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (int(self.lora_b[m].shape[0]), int(self.lora_a[m].shape[1])) for m in self.modules}

    def delta(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW = scale · B · A for one module."""
        return self.scale * (self.lora_b[module].to(dtype) @ self.lora_a[module].to(dtype))


def delta_weights(adapter: _LoraWeights, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full update ΔW = scale · B · A of every module (computed in float64) of an adapter or a merge."""
    return {m: adapter.delta(m).to(dtype) for m in sorted(adapter.lora_a)}


def adapter_sha256(adapter_dir: str | os.PathLike[str]) -> str:
    """sha256 of the adapter's weights file: the adapter's identity in the state store."""
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / ADAPTER_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_adapter(
    adapter_dir: str | os.PathLike[str],
    *,
    reference: ModuleShapes | None = None,
    label: str | None = None,
) -> Adapter:
    """Validate a peft LoRA adapter (or training checkpoint) directory in place and load it;
    ``InvalidAdapter`` if refused (``core/adapters/format.py``). ``reference`` ({module:
    (out_features, in_features)}, e.g. from the base model) additionally requires exactly these
    modules with these shapes."""
    files = read_adapter_dir(adapter_dir, reference=reference)
    return Adapter(files.lora_a, files.lora_b, files.config, path=files.path, sha256=adapter_sha256(files.path),
                   label=label, result=files.result)


@dataclass(frozen=True)
class Rejection:
    source: str
    reason: str


@dataclass(frozen=True)
class ClipEvent:
    source: str
    module: str
    norm: float
    bound: float


def load_adapters(
    adapter_dirs: Iterable[str | os.PathLike[str]], *, reference: ModuleShapes | None = None
) -> tuple[list[Adapter], list[Rejection]]:
    """Load many adapters; a refused one is reported, not fatal (one bad node must not block)."""
    loaded: list[Adapter] = []
    rejected: list[Rejection] = []
    for d in adapter_dirs:
        try:
            loaded.append(load_adapter(d, reference=reference, label=str(d)))
        except InvalidAdapter as exc:
            rejected.append(Rejection(str(d), exc.reason))
    return loaded, rejected


# --------------------------------------------------------------------------------------------
# Saving


def save_adapter(
    adapter: _LoraWeights,
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write a peft-loadable adapter directory atomically; return its sha256 (``adapter_sha256``).

    ``config`` entries override the adapter's own config (e.g. ``base_model_name_or_path``); the
    result is validated like any incoming adapter, so we never write what we would refuse.
    """
    out = Path(out_dir)
    final_config = validate_adapter_config({**adapter.config, **(config or {})}, out)
    check_lora_tensors(adapter.lora_a, adapter.lora_b, final_config, out)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(adapter.lora_a):
        tensors[f"base_model.model.{module}.lora_A.weight"] = adapter.lora_a[module].detach().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = adapter.lora_b[module].detach().contiguous().cpu()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(final_config, f, indent=2, sort_keys=True)

    # core/publish.py: readers never see a half-written adapter; a taken name is refused.
    publish_dir(out, write, replace=overwrite)
    return adapter_sha256(out)
