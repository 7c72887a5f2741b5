"""Candidates: screen and merge the adapters of a dialect, recognize test sets, decide at the gate.

Glue between screening, merge, model, features and gates; still no Dagster. ``merge_candidate``
is the one call for every merge -- a chain's candidate and a distributed round alike.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mloc_dagster.core.adapters.format import InvalidAdapter, read_adapter_dir
from mloc_dagster.core.adapters.lora import Adapter, load_adapter, load_adapters, save_adapter
from mloc_dagster.core.data.features import load_features
from mloc_dagster.core.gates.scoring import UttResult
from mloc_dagster.core.merging.merge import MergeResult
from mloc_dagster.core.merging.screening import DEFAULT_SCREENING, MergeInputs, ScreeningRule, screen_and_merge
from mloc_dagster.core.models.families import load_base_model


def load_trusted(adapter_dir: str | os.PathLike[str] | None, what: str) -> Adapter | None:
    """The start or reference adapter of a screened merge (a training checkpoint or a plain peft
    directory), validated like any node's. These come from the server, so a bad one is the
    caller's error: ``ValueError`` naming it."""
    if adapter_dir is None:
        return None
    try:
        return load_adapter(adapter_dir, label=str(adapter_dir))
    except InvalidAdapter as exc:
        raise ValueError(f"{what} adapter {adapter_dir} cannot be used: {exc}") from exc


def merge_candidate(adapter_dirs: Sequence[str], weights: Sequence[float], out_dir: Path,
                    method: str = "weighted_mean", *, reference: str | os.PathLike[str] | None = None,
                    start_adapter: str | os.PathLike[str] | None = None,
                    node_of: Mapping[str, str | None] | None = None,
                    samples: Sequence[int] | None = None,
                    rule: ScreeningRule = DEFAULT_SCREENING, overwrite: bool = True,
                    **merge_kw) -> tuple[MergeResult, str]:
    """Screen and merge the adapters of ``adapter_dirs`` (training checkpoints) into ``out_dir``;
    returns (result, sha256 of the written adapter).

    ``weights``: each adapter's base weight (samples, reputation); ``reference``: the trusted
    reference update's checkpoint (``core.merging.screening.train_reference_update``), None: no direction
    score; ``start_adapter``: what the adapters were trained from (the previous round's merged
    adapter), None: nothing (ΔW_start = 0); ``node_of``: source path → node id (default: each
    checkpoint's result.json); ``samples``: the samples placed on each adapter (the norm bound is
    per √sample; default: each job's reported total_samples); ``overwrite``: replace an existing
    ``out_dir`` (a round's own output, rewritten by its retry), False: refuse it (``FileExistsError``;
    a candidate's id is unique). Screening rules: ``core/merging/screening.py``. ``result.summary()``
    carries the per-source table under ``"screening"``; an adapter ``core/adapters/format.py`` refuses
    (a malformed ``result.json`` included) is a refused row with the reason and stays on disk. Raises
    ``ValueError`` when no adapter is accepted, or when ``reference`` / ``start_adapter`` cannot
    be read."""
    if len(weights) != len(adapter_dirs):
        raise ValueError(f"{len(weights)} weights for {len(adapter_dirs)} adapters")
    start, ref = load_trusted(start_adapter, "start"), load_trusted(reference, "reference")
    adapters, rejected = load_adapters(adapter_dirs)  # validated in place; a refused one stays on disk
    weight_of = {str(d): float(w) for d, w in zip(adapter_dirs, weights, strict=True)}
    inputs = MergeInputs(start=start, reference=ref, results={a.source: a.result for a in adapters},
                         start_result=start.result if start else {}, reference_result=ref.result if ref else {},
                         samples=dict(zip(map(str, adapter_dirs), samples, strict=True)) if samples else {})
    result = screen_and_merge(adapters, [weight_of[a.source] for a in adapters], inputs, method=method,
                              refused=rejected, node_of=node_of, rule=rule, **merge_kw)
    return result, save_adapter(result, out_dir, overwrite=overwrite)


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

        from mloc_dagster.core.models.evaluate import transcribe

        model = self.base.model
        if adapter_dir is not None:  # peft injects layers in place: merge into a copy, keep the base clean
            read_adapter_dir(adapter_dir, base_model=model)  # what peft will read passes our rules first
            model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload()
        key = (str(version_path), split)
        if key not in self._features:
            self._features[key] = load_features(version_path, split, self.base.feature_extractor,
                                                cache_dir=self.feature_cache)
        with torch.no_grad():
            records = transcribe(model.to(self.device), self.base.family, self._features[key], device=self.device)
        return [UttResult(r["utt_id"], r["speaker"], r["ref"], r["hyp"]) for r in records]
