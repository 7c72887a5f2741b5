"""Candidates: merge the adapters of a dialect, recognize test sets, decide at the gate.

Glue between merge, model, features and gates; still no Dagster.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mloc_dagster.core.checkpoints import CheckpointError, validate_checkpoint_dir
from mloc_dagster.core.features import load_features
from mloc_dagster.core.gates import UttResult
from mloc_dagster.core.merge import (
    InvalidAdapter,
    MergeResult,
    Rejection,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from mloc_dagster.core.model import load_base_model

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


def stage_adapters(checkpoint_dirs: Sequence[str], staging: Path) -> tuple[dict[str, str], list[Rejection]]:
    """A training checkpoint holds the adapter plus its training state. Validate the whole
    directory (no pickles, finite tensors, allowed config), then stage exactly the two peft files
    merging may read, so merge.load_adapter sees only what a node is allowed to submit.
    Returns {staged dir: checkpoint dir} and the refused checkpoints."""
    staged, refused = {}, []
    for i, d in enumerate(checkpoint_dirs):
        try:
            validate_checkpoint_dir(d)
        except CheckpointError as exc:
            refused.append(Rejection(str(d), str(exc)))
            continue
        dest = staging / f"{i:04d}"
        dest.mkdir(parents=True)
        for name in PEFT_FILES:
            shutil.copyfile(Path(d) / name, dest / name)
        staged[str(dest)] = str(d)
    return staged, refused


def merge_candidate(adapter_dirs: Sequence[str], weights: Sequence[float], out_dir: Path,
                    method: str = "weighted_mean") -> tuple[MergeResult, str]:
    """Merge the adapters of ``adapter_dirs`` (training checkpoints; bad ones refused) into
    ``out_dir``; returns (result, sha256). Raises ``ValueError`` when none survives validation."""
    weight_of = {str(d): w for d, w in zip(adapter_dirs, weights)}
    with tempfile.TemporaryDirectory(prefix="mloc-merge-") as tmp:
        staged, rejected = stage_adapters(adapter_dirs, Path(tmp))
        adapters = []
        for staged_dir, source in staged.items():
            try:
                adapters.append(load_adapter(staged_dir, label=source))
            except InvalidAdapter as exc:
                rejected.append(Rejection(source, exc.reason))
        if not adapters:
            reasons = "; ".join(f"{r.source}: {r.reason}" for r in rejected) or "no adapters given"
            raise ValueError(f"nothing to merge: {reasons}")
        result = merge_adapters(adapters, [weight_of[staged[str(a.path)]] for a in adapters], method=method)
    result.rejected.extend(rejected)
    return result, save_adapter(result, out_dir, overwrite=True)


class Recognizer:
    """Recognizes test splits with one base model, alone or with an adapter merged into a copy.

    The base model is loaded once and each split's features once, however many (adapter, split)
    pairs a gate evaluates."""

    def __init__(self, base_model_dir: str | Path, feature_cache: str | Path | None = None, device: str = "cpu"):
        self.base = load_base_model(base_model_dir, device)
        self.feature_cache = feature_cache
        self.device = device
        self._features: dict[tuple[str, str], object] = {}

    def __call__(self, adapter_dir: str | Path | None, version_path: str | Path,
                 split: str = "test") -> list[UttResult]:
        from peft import PeftModel

        from mloc_dagster.core.evaluate import transcribe

        model = self.base.model
        if adapter_dir is not None:  # peft injects layers in place: merge into a copy, keep the base clean
            model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload()
        key = (str(version_path), split)
        if key not in self._features:
            self._features[key] = load_features(version_path, split, self.base.feature_extractor,
                                                cache_dir=self.feature_cache)
        with torch.no_grad():
            records = transcribe(model.to(self.device), self.base.tokenizer, self._features[key], device=self.device)
        return [UttResult(r["utt_id"], r["speaker"], r["ref"], r["hyp"]) for r in records]
