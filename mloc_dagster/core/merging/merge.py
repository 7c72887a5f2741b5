"""Merging LoRA adapters from many nodes into one adapter (SPEC §5).

A LoRA adapter changes each targeted linear layer by ΔW = scale · B · A (scale = alpha / r, or
alpha / sqrt(r) with rsLoRA). Merging happens on ΔW, never on A and B separately: the mean of the
factors is not the factor of the mean (mean(B)·mean(A) adds cross-terms B_i·A_j), and two adapters
that learned the same ΔW can have completely different factors (B·A = (B·Q)·(Q⁻¹·A)).

Adapters trained from a common *start* (the slices of a distributed round all start from the
previous round's merged adapter) are merged on their updates ``U_i = ΔW_i − ΔW_start``; chains
that start from nothing have ``ΔW_start = 0``. Per module, the merge

1. bounds each adapter's update to a Frobenius norm (default: ``norm_factor`` × the median norm
   over the adapters, optionally per unit of expected size such as √samples), so a single
   exploding or malicious adapter cannot dominate;
2. combines them: weighted mean (weights: samples, reputation, screening), or coordinate-wise
   trimmed mean / median, which tolerate a minority of poisoned adapters;
3. adds the start back and factors the result to rank r with a truncated SVD. By Eckart–Young
   this is the closest rank-r matrix; the relative error ``‖M − M_r‖_F / ‖M‖_F`` is reported per
   module and is 0 (up to float rounding) whenever the merged ΔW has rank ≤ r -- in particular a
   single adapter merges to itself, with or without a start.

What an adapter directory may hold is ``core/adapters/format.py``; reading and writing one is
``core/adapters/lora.py``; deciding which adapters go in and with what weight is ``core/merging/screening.py``.

Everything here is plain torch + safetensors; the files written are what peft's
``save_pretrained`` writes, so ``PeftModel.from_pretrained(base, out_dir)`` loads a merge.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mloc_dagster.core.adapters.format import InvalidAdapter, ModuleShapes, check_shapes, targeted
from mloc_dagster.core.adapters.lora import Adapter, ClipEvent, Rejection, lora_scale

MergeMethod = Literal["weighted_mean", "trimmed_mean", "median"]
_METHODS: tuple[str, ...] = ("weighted_mean", "trimmed_mean", "median")


# --------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True, eq=False)
class MergeResult:
    """A merged adapter (rank ``rank``) and how it was made."""

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict[str, Any]
    method: str
    rank: int
    sources: list[str]  # adapters that went in, in input order
    weights: list[float]  # their normalized weights (used by weighted_mean)
    norm_bounds: dict[str, float]  # per-module Frobenius bound applied to each ΔW_i
    truncation_error: dict[str, float]  # per module ‖M − M_r‖_F / ‖M‖_F
    clipped: list[ClipEvent] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    start: str | None = None  # the adapter the inputs were trained from (merged on updates from it)
    # Per-source screening rows (``core.merging.screening.Screened.to_dict``), when the merge was screened.
    screening: list[dict[str, Any]] = field(default_factory=list)
    reference: str | None = None  # the trusted reference update the screening scored against
    update_gain: float = 1.0  # the combined update was multiplied by this (a server learning rate)

    @property
    def scale(self) -> float:
        return lora_scale(self.config)

    @property
    def max_truncation_error(self) -> float:
        return max(self.truncation_error.values(), default=0.0)

    def delta(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.scale * (self.lora_b[module].to(dtype) @ self.lora_a[module].to(dtype))

    def summary(self) -> dict[str, Any]:
        """JSON-able description for metadata and the candidate record."""
        return {
            "method": self.method,
            "rank": self.rank,
            "n_adapters": len(self.sources),
            "sources": self.sources,
            "weights": self.weights,
            "max_truncation_error": self.max_truncation_error,
            "truncation_error": self.truncation_error,
            "norm_bounds": self.norm_bounds,
            "clipped": [vars(c) for c in self.clipped],
            "rejected": [vars(r) for r in self.rejected],
            "start_adapter": self.start,
            "reference": self.reference,
            "update_gain": self.update_gain,
            "screening": self.screening,
        }


def _finite_tensors(adapter: Adapter) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*adapter.lora_a.values(), *adapter.lora_b.values()))


def _combine(stack: torch.Tensor, weights: torch.Tensor, method: str, trim_fraction: float) -> torch.Tensor:
    """Combine n ΔW matrices stacked on dim 0."""
    n = stack.shape[0]
    if method == "weighted_mean":
        return torch.tensordot(weights / weights.sum(), stack, dims=1)
    ordered = stack.sort(dim=0).values
    if method == "trimmed_mean":
        k = math.floor(trim_fraction * n)
        return ordered[k : n - k].mean(dim=0)
    # median; the mean of the two middle values for even n (torch.median takes the lower one,
    # which would make a two-adapter "median" equal to one of them coordinate by coordinate).
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _factor(matrix: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors with scale·B·A = truncated SVD of ``matrix``; and the relative error."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = torch.sqrt(s[:keep] / scale)  # split √S evenly: both factors equally conditioned
    b = torch.zeros(matrix.shape[0], rank, dtype=matrix.dtype)
    a = torch.zeros(rank, matrix.shape[1], dtype=matrix.dtype)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    total = float(torch.sum(s**2))
    error = math.sqrt(float(torch.sum(s[keep:] ** 2)) / total) if total > 0 else 0.0
    return a, b, error


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    method: MergeMethod = "weighted_mean",
    max_norm: float | None = None,
    norm_factor: float = 3.0,
    trim_fraction: float = 0.2,
    rank: int | None = None,
    reference: ModuleShapes | None = None,
    start: Adapter | None = None,
    update_scales: Sequence[float] | None = None,
    norm_units: Sequence[float] | None = None,
    update_gain: float = 1.0,
) -> MergeResult:
    """Merge LoRA adapters in ΔW space and factor the result back to rank ``rank``.

    - ``weights``: e.g. node reputations; non-negative; weight 0 excludes an adapter. They weight
      ``weighted_mean``; the robust methods use them only to exclude (a weighted median would let
      one heavy adapter decide alone).
    - ``max_norm``: per-module Frobenius bound on each adapter's ΔW (clipped to it, direction
      kept). None: ``norm_factor`` × the median norm of that module over the adapters -- robust to
      a minority of huge updates, never clips a single adapter. ``math.inf`` disables clipping.
    - ``trim_fraction``: share of values dropped at *each* end per coordinate for ``trimmed_mean``.
    - ``rank``: rank of the result, default the first adapter's r.
    - ``reference``: expected {module: (out, in)}; default: ``start``'s layout, else the module
      layout most adapters share.
    - ``start``: the adapter every input was trained from; the norm bound and the combination act
      on the updates ``ΔW_i − ΔW_start`` and the start is added back (None: ΔW_start = 0).
    - ``update_scales``: a factor in (0, 1] per adapter applied to its whole update first (the
      screening's global norm bound, ``core/merging/screening.py``); None: 1.
    - ``norm_units``: how large each adapter's update is expected to be (e.g. √samples: updates
      of bigger slices are bigger); the default bound becomes ``norm_factor`` × the median of
      ``norm / unit`` × the adapter's own unit. None: 1 for all.
    - ``update_gain``: the combined update is multiplied by it before the start is added back (a
      server learning rate). 1: the mean, what rounds merge with; adding a round's updates up (the
      slices' count) diverges (``bench/pool_learning.py``, docs/distributed.md).

    Adapters that do not fit (other modules/shapes, non-finite values) are rejected and listed in
    the result; if none is left, ``InvalidAdapter`` is raised.
    """
    if not adapters:
        raise ValueError("nothing to merge")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be within [0, 0.5), got {trim_fraction}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if update_scales is None:
        update_scales = [1.0] * len(adapters)
    if len(update_scales) != len(adapters) or any(not 0.0 < c <= 1.0 for c in update_scales):
        raise ValueError(f"update_scales must be one factor in (0, 1] per adapter, got {list(update_scales)}")
    if norm_units is None:
        norm_units = [1.0] * len(adapters)
    if len(norm_units) != len(adapters) or any(not (math.isfinite(u) and u > 0) for u in norm_units):
        raise ValueError(f"norm_units must be one positive number per adapter, got {list(norm_units)}")
    if not (math.isfinite(update_gain) and update_gain > 0):
        raise ValueError(f"update_gain must be a positive number, got {update_gain}")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")

    if reference is None and start is not None:
        reference = start.shapes
    if reference is None:
        layouts = Counter(tuple(sorted(a.shapes.items())) for a in adapters)
        reference = dict(layouts.most_common(1)[0][0])  # ties: the first layout seen
    rejected: list[Rejection] = []
    kept: list[tuple[Adapter, float]] = []
    factor: dict[int, float] = {}
    units: list[float] = []
    for adapter, w, c, unit in zip(adapters, weights, update_scales, norm_units, strict=True):
        if w == 0:
            rejected.append(Rejection(adapter.source, "weight 0"))
            continue
        if not _finite_tensors(adapter):
            rejected.append(Rejection(adapter.source, "contains NaN or infinite values"))
            continue
        try:
            check_shapes(adapter.shapes, reference, adapter.source)
        except InvalidAdapter as exc:
            rejected.append(Rejection(adapter.source, exc.reason))
            continue
        kept.append((adapter, float(w)))
        factor[len(kept) - 1] = float(c)
        units.append(float(unit))
    if not kept:
        reasons = "; ".join(f"{r.source}: {r.reason}" for r in rejected)
        raise InvalidAdapter(None, f"no adapter left to merge ({reasons})")

    first = kept[0][0]
    rank = first.r if rank is None else int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    modules = sorted(reference)
    config = dict(first.config)
    config["r"] = rank
    if not all(targeted(m, config["target_modules"]) for m in modules):
        config["target_modules"] = modules  # exact module paths always match
    out_scale = lora_scale(config)
    w_tensor = torch.tensor([w for _, w in kept], dtype=torch.float64)

    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    bounds: dict[str, float] = {}
    errors: dict[str, float] = {}
    clipped: list[ClipEvent] = []
    for module in modules:
        base = start.delta(module) if start is not None else None
        stack = torch.stack([a.delta(module) for a, _ in kept])  # (n, out, in), float64
        if base is not None:
            stack -= base  # updates from the common start
        for i, c in factor.items():
            if c != 1.0:
                stack[i] *= c
        norms = torch.linalg.matrix_norm(stack)  # Frobenius, per adapter
        unit = torch.tensor(units, dtype=norms.dtype)
        # For even n torch.median is the lower middle value: a slightly tighter default bound.
        bound = float(max_norm) if max_norm is not None else norm_factor * float((norms / unit).median())
        bounds[module] = bound  # per unit (1 unless norm_units are given)
        if bound > 0:
            for i, ((adapter, _), norm) in enumerate(zip(kept, norms.tolist(), strict=True)):
                own = bound if max_norm is not None else bound * units[i]
                if norm > own:
                    stack[i] *= own / norm
                    clipped.append(ClipEvent(adapter.source, module, norm, own))
        merged = _combine(stack, w_tensor, method, trim_fraction) * update_gain
        if base is not None:
            merged += base
        a, b, errors[module] = _factor(merged, rank, out_scale)
        lora_a[module], lora_b[module] = a.to(torch.float32), b.to(torch.float32)

    total_w = float(w_tensor.sum())
    return MergeResult(
        lora_a=lora_a,
        lora_b=lora_b,
        config=config,
        method=method,
        rank=rank,
        sources=[a.source for a, _ in kept],
        weights=[w / total_w for _, w in kept],
        norm_bounds=bounds,
        truncation_error=errors,
        clipped=clipped,
        rejected=rejected,
        start=start.source if start is not None else None,
        update_gain=update_gain,
    )


