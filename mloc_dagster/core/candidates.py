"""Candidates: merge the adapters of a dialect, recognize test sets, decide at the gate.

Glue between merge, model, features and gates; still no Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mloc_dagster.core.features import load_features
from mloc_dagster.core.gates import UttResult
from mloc_dagster.core.merge import MergeResult, load_adapters, merge_adapters, save_adapter
from mloc_dagster.core.model import load_base_model


def merge_candidate(adapter_dirs: Sequence[str], weights: Sequence[float], out_dir: Path,
                    method: str = "weighted_mean") -> tuple[MergeResult, str]:
    """Merge ``adapter_dirs`` (refusing bad ones) into ``out_dir``; returns (result, sha256).

    Raises ``ValueError`` when no adapter survives validation."""
    adapters, rejected = load_adapters(adapter_dirs)
    if not adapters:
        reasons = "; ".join(f"{r.path}: {r.reason}" for r in rejected) or "no adapters given"
        raise ValueError(f"nothing to merge: {reasons}")
    weight_of = {str(Path(d)): w for d, w in zip(adapter_dirs, weights)}
    result = merge_adapters(adapters, [weight_of.get(str(a.path), 1.0) for a in adapters], method=method)
    if rejected:
        result.rejected.extend(rejected)
    sha = save_adapter(result, out_dir, overwrite=True)
    return result, sha


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
