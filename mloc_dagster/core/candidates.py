"""Candidates: merge the adapters of a dialect, recognize test sets, decide at the gate.

Glue between merge, model, features and gates; still no Dagster.
"""

from __future__ import annotations

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


def recognize(base_model_dir: str | Path, adapter_dir: str | Path | None, version_path: str | Path,
              split: str = "test", feature_cache: str | Path | None = None,
              device: str = "cpu") -> list[UttResult]:
    """Recognize one split with the base model, plus an adapter when given (merged in for speed)."""
    from peft import PeftModel

    from mloc_dagster.core.evaluate import transcribe

    bm = load_base_model(base_model_dir, device)
    model = bm.model
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    features = load_features(version_path, split, bm.feature_extractor, cache_dir=feature_cache)
    with torch.no_grad():
        records = transcribe(model.to(device), bm.tokenizer, features, device=device)
    return [UttResult(r["utt_id"], r["speaker"], r["ref"], r["hyp"]) for r in records]
