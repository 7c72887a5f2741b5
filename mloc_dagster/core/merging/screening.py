"""Screening every adapter that goes into a merge (SPEC §5, issue 10 item 4).

A merge takes adapters from nodes we do not control. Each one is screened against an update the
server trusts and either **accepted** with a weight, **excluded** (weight 0, its direction is
worthless) or **refused** with a reason. Nothing is deleted: a refused adapter stays where the
node left it, and its row (source, node, weight, cosine, norm, dev CER, decision, reason) goes
into the merge summary and the merged candidate's metadata.

The rules, in order (an adapter's *update* is ``U = ΔW − ΔW_start``, all modules flattened into
one vector; ``ΔW_start`` is the adapter it was trained from -- the previous round's merged
adapter for a distributed-round slice, 0 for a chain that started from nothing):

1. **refused, unreadable**: anything ``core/adapters/format.py`` refuses (unsafe files, a config
   or tensors outside the rules, a malformed ``result.json``), another module layout than the start's;
2. **refused, empty update**: ``‖U‖`` is 0 (below 1e-6 × the largest update in the merge): the
   node returned its start unchanged (a free-rider) or trained nothing;
3. **refused, dev loss not sane**: the node's own ``result.json`` (written next to the adapter by
   ``train_adapter``) reports ``dev_cer > max(baseline + 0.05, 1.25 × baseline)``. The baseline
   is the reference's dev CER (trained from the same start, so ≈ the start's), else the start's
   own ``result.json``; without a baseline or a reported dev CER the check is skipped. This is a
   sanity check on what the node reports, not a re-evaluation (the gate evaluates the merge);
4. **direction** (FLTrust, Cao et al. NDSS 2021): ``cos = ⟨U, U_ref⟩ / (‖U‖ ‖U_ref‖)`` against
   the reference update ``U_ref`` -- an adapter trained by the server from the same start on a
   small trusted root set (``train_reference_update``). Its score is ``core.pool.reputation.
   direction_score`` (0 at cos ≤ 0, 1 at cos ≥ 0.5, linear between; 1 without a reference) and
   the adapter's weight is ``base weight × score``; score 0 → **excluded**. FLTrust uses
   ReLU(cos) and rescales every update to the reference's norm; we keep the node's norm instead,
   because the reference is trained on far fewer samples than a slice (rescaling would shrink
   honest work), and bound it in the merge;
5. **norm bound**: an update grows with the samples it was trained on (about as √n), so the
   bound is per √sample: each accepted update is scaled down to at most ``norm_factor`` (2) ×
   the median of ``‖U‖ / √n`` over the accepted adapters and the trusted reference (an anchor
   a minority of attackers cannot move) × its own ``√n`` (``n``: the samples the caller placed
   on it, else its job's reported ``total_samples``; unknown for any → plain median of ``‖U‖``).
   This global bound replaces ``core.merging.merge.merge_adapters``' per-module one in a screened merge
   (pass ``max_norm``/``norm_factor`` to have both). Without a reference, two adapters are never
   clipped (neither is the odd one out).
   A clipped adapter keeps its weight and is marked ``clipped`` (its reputation target is capped).

Reputation moves after every screened merge with the one documented rule
(``core.pool.reputation.reputation_from_merge``; ``reputation_updates`` maps the rows onto it):
refused for 1–2 → refusal step; dev loss not sane → target 0; accepted/excluded → target =
direction score (capped at 0.5 when clipped).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from mloc_dagster.core.adapters.format import InvalidAdapter, check_shapes, read_node_result
from mloc_dagster.core.adapters.lora import Adapter, Rejection
from mloc_dagster.core.merging.merge import MergeResult, merge_adapters
from mloc_dagster.core.pool.reputation import (
    DEFAULT_RULE,
    ReputationRule,
    ReputationUpdate,
    direction_score,
    reputation_from_merge,
)

ACCEPTED, EXCLUDED, REFUSED = "accepted", "excluded", "refused"
DEV_LOSS_NOT_SANE = "dev loss not sane"
EMPTY_UPDATE = "empty update: ΔW equals the start adapter's"


@dataclass(frozen=True, slots=True)
class ScreeningRule:
    dev_cer_abs_margin: float = 0.05  # refused above max(baseline + abs, rel × baseline)
    dev_cer_rel_margin: float = 1.25
    empty_update_rel: float = 1e-6  # ‖U‖ at most this × the largest update: empty
    norm_factor: float = 2.0  # global bound: this × the median per-√sample norm × √n
    reputation: ReputationRule = DEFAULT_RULE


DEFAULT_SCREENING = ScreeningRule()


@dataclass(frozen=True, slots=True)
class Screened:
    """One adapter's screening outcome: a row of the merge's per-source table."""

    source: str
    node_id: str | None = None
    base_weight: float = 1.0  # what the caller gave (samples, reputation)
    weight: float = 0.0  # base weight × direction score; 0 unless accepted
    cosine: float | None = None  # with the reference update (None: no reference)
    norm: float | None = None  # ‖ΔW − ΔW_start‖_F over all modules
    dev_cer: float | None = None  # as the node's result.json reports it
    samples: int | None = None  # placed on it by the caller, else its job's total_samples
    clip: float = 1.0  # factor its update was scaled by (rule 5)
    decision: str = ACCEPTED  # accepted | excluded | refused
    reason: str = ""
    clipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reported_node(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The node a refused adapter's ``result.json`` names, if it can be read (for its table row)."""
    try:
        return read_node_result(adapter_dir, required=False).get("node_id")
    except InvalidAdapter:
        return None


def reported_dev_cer(result: Mapping[str, Any]) -> float | None:
    value = result.get("dev_cer")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def dev_loss_sane(dev_cer: float | None, baseline: float | None, rule: ScreeningRule = DEFAULT_SCREENING) -> bool:
    """Rule 3: not much worse than the baseline; unknown either side → sane."""
    if dev_cer is None or baseline is None:
        return True
    return dev_cer <= max(baseline + rule.dev_cer_abs_margin, rule.dev_cer_rel_margin * baseline)


def reported_samples(result: Mapping[str, Any]) -> int | None:
    value = result.get("total_samples", result.get("samples"))
    return int(value) if isinstance(value, int) and value > 0 else None


def norm_bound(rows: list[Screened], rule: ScreeningRule = DEFAULT_SCREENING,
               anchor: Screened | None = None) -> list[Screened]:
    """Rule 5 on the accepted rows: scale each update to at most norm_factor × the median
    per-√sample norm × √n; the trusted reference (``anchor``) counts as one more value."""
    live = [r for r in rows if r.decision == ACCEPTED and r.norm]
    if not live:
        return rows
    pool = live + ([anchor] if anchor is not None and anchor.norm else [])
    units = norm_units(pool)
    root = {r.source: u for r, u in zip(live, units, strict=False)}
    typical = statistics.median(r.norm / u for r, u in zip(pool, units, strict=True))
    out = []
    for r in rows:
        if r in live and r.norm > rule.norm_factor * typical * root[r.source]:
            r = replace(r, clip=rule.norm_factor * typical * root[r.source] / r.norm, clipped=True)
        out.append(r)
    return out


def norm_units(rows: Sequence[Screened]) -> list[float]:
    """√samples per row when every row knows its samples, else 1s (the size an update is expected to have)."""
    known = all(r.samples for r in rows)
    return [math.sqrt(r.samples) if known and r.samples else 1.0 for r in rows]


def updates(adapter: Adapter, start: Adapter | None = None) -> dict[str, torch.Tensor]:
    """``ΔW − ΔW_start`` per module, float64."""
    return {m: adapter.delta(m) - (start.delta(m) if start is not None else 0.0) for m in adapter.modules}


def _dot(u: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> float:
    return float(sum(torch.sum(u[m] * v[m]) for m in u))


def update_norm(u: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(max(_dot(u, u), 0.0))


def cosine(u: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> float:
    """Cosine of two updates flattened over all modules (0 when either is zero)."""
    nu, nv = update_norm(u), update_norm(v)
    return _dot(u, v) / (nu * nv) if nu > 0 and nv > 0 else 0.0


def screen(adapters: Sequence[Adapter], base_weights: Sequence[float], *, start: Adapter | None = None,
           reference: Adapter | None = None, baseline_dev_cer: float | None = None,
           results: Mapping[str, Mapping[str, Any]] | None = None,
           samples: Mapping[str, int] | None = None, reference_samples: int | None = None,
           rule: ScreeningRule = DEFAULT_SCREENING) -> list[Screened]:
    """Rules 2–5 for loaded adapters (``results``: each source's job result, for dev CER, node and
    samples; ``samples``: what the caller placed on each source, overriding the reported ones)."""
    if len(base_weights) != len(adapters):
        raise ValueError(f"{len(base_weights)} weights for {len(adapters)} adapters")
    if any(not (math.isfinite(w) and w >= 0) for w in base_weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(base_weights)}")
    results = results or {}
    layout = start.shapes if start is not None else reference.shapes if reference is not None else None
    ref_update = updates(reference, start) if reference is not None else None
    rows: list[Screened] = []
    fits: list[tuple[int, dict[str, torch.Tensor]]] = []
    for i, adapter in enumerate(adapters):
        result = results.get(adapter.source, {})
        row = Screened(adapter.source, result.get("node_id"), float(base_weights[i]),
                       dev_cer=reported_dev_cer(result),
                       samples=(samples or {}).get(adapter.source) or reported_samples(result))
        try:
            if layout is not None:
                check_shapes(adapter.shapes, layout, adapter.source)
        except InvalidAdapter as exc:
            row = replace(row, decision=REFUSED, reason=exc.reason)
        else:
            fits.append((i, updates(adapter, start)))
        rows.append(row)
    norms = {i: update_norm(u) for i, u in fits}
    largest = max([*norms.values(), update_norm(ref_update) if ref_update is not None else 0.0], default=0.0)
    for i, u in fits:
        cos = cosine(u, ref_update) if ref_update is not None else None
        row = replace(rows[i], norm=norms[i], cosine=cos)
        if norms[i] <= rule.empty_update_rel * largest or norms[i] == 0.0:
            row = replace(row, decision=REFUSED, reason=EMPTY_UPDATE)
        elif not dev_loss_sane(row.dev_cer, baseline_dev_cer, rule):
            row = replace(row, decision=REFUSED, reason=f"{DEV_LOSS_NOT_SANE}: dev CER {row.dev_cer:.3f} vs "
                                                        f"baseline {baseline_dev_cer:.3f}")
        else:
            score = direction_score(cos, rule.reputation)
            weight = row.base_weight * score
            if weight > 0:
                row = replace(row, weight=weight, reason="" if cos is None else f"direction score {score:.2f}")
            elif row.base_weight == 0:
                row = replace(row, decision=EXCLUDED, reason="base weight 0")
            else:
                row = replace(row, decision=EXCLUDED, reason=f"direction: cosine {cos:.2f} with the reference")
        rows[i] = row
    anchor = (Screened(reference.source, norm=update_norm(ref_update), samples=reference_samples)
              if reference is not None and ref_update is not None else None)
    return norm_bound(rows, rule, anchor)


@dataclass(frozen=True)
class MergeInputs:
    """What a screened merge needs besides the adapters: the start they were trained from, the
    trusted reference update, and their job results (``Adapter.result``) keyed by source."""

    start: Adapter | None = None
    reference: Adapter | None = None
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    samples: Mapping[str, int] = field(default_factory=dict)  # placed per source (rule 5)
    start_result: Mapping[str, Any] = field(default_factory=dict)
    reference_result: Mapping[str, Any] = field(default_factory=dict)

    @property
    def baseline_dev_cer(self) -> float | None:
        """The reference's dev CER, else the start's (rule 3)."""
        ref = reported_dev_cer(self.reference_result) if self.reference is not None else None
        return ref if ref is not None else reported_dev_cer(self.start_result)


def screen_and_merge(adapters: Sequence[Adapter], base_weights: Sequence[float], inputs: MergeInputs = MergeInputs(),
                     *, method: str = "weighted_mean", refused: Sequence[Rejection] = (),
                     node_of: Mapping[str, str | None] | None = None,
                     rule: ScreeningRule = DEFAULT_SCREENING, **merge_kw: Any) -> MergeResult:
    """Screen, merge the accepted adapters with their screened weights (on updates from
    ``inputs.start``), and return the merge with one screening row per source -- including the
    ``refused`` ones the caller could not even load. Raises ``InvalidAdapter`` (a ``ValueError``)
    when no adapter is accepted, naming every source's reason."""
    rows = screen(adapters, base_weights, start=inputs.start, reference=inputs.reference,
                  baseline_dev_cer=inputs.baseline_dev_cer, results=inputs.results, samples=inputs.samples,
                  reference_samples=reported_samples(inputs.reference_result), rule=rule)
    rows += [Screened(r.source, reported_node(r.source), decision=REFUSED, reason=r.reason)
             for r in refused]
    if node_of:
        rows = [replace(r, node_id=node_of.get(r.source) or r.node_id) for r in rows]
    by_source = {a.source: a for a in adapters}
    accepted = [r for r in rows if r.decision == ACCEPTED]
    if not accepted:
        reasons = "; ".join(f"{r.source}: {r.decision} ({r.reason})" for r in rows) or "no adapters given"
        raise InvalidAdapter(None, f"no adapter accepted by screening ({reasons})")
    if "max_norm" not in merge_kw and "norm_factor" not in merge_kw:
        merge_kw["max_norm"] = math.inf  # rule 5 is the bound; merge_adapters' per-module one is off
    result = merge_adapters([by_source[r.source] for r in accepted], [r.weight for r in accepted], method=method,
                            start=inputs.start, update_scales=[r.clip for r in accepted],
                            norm_units=norm_units(accepted), **merge_kw)
    dropped = {x.source: x.reason for x in result.rejected}
    clipped = {c.source for c in result.clipped}
    rows = [replace(r, decision=REFUSED, weight=0.0, reason=dropped[r.source]) if r.source in dropped
            else replace(r, clipped=r.clipped or r.source in clipped) for r in rows]
    rejected = [Rejection(r.source, r.reason) for r in rows if r.decision == REFUSED]
    return replace(result, rejected=rejected, screening=[r.to_dict() for r in rows],
                   reference=inputs.reference.source if inputs.reference is not None else None)


def reputation_updates(rows: Sequence[Screened | Mapping[str, Any]], node_of: Mapping[str, str | None] | None = None,
                       rule: ReputationRule = DEFAULT_RULE) -> dict[str, ReputationUpdate]:
    """One reputation step per node from a screened merge (``core.pool.reputation.reputation_from_merge``):
    refused rows step towards 0 at the refusal rate, except "dev loss not sane" (target 0 at the
    screening rate); accepted and excluded rows step towards their direction score."""
    table = [r if isinstance(r, Screened) else Screened(**r) for r in rows]
    nodes = {r.source: (node_of or {}).get(r.source) or r.node_id for r in table}
    insane = {r.source for r in table if r.decision == REFUSED and r.reason.startswith(DEV_LOSS_NOT_SANE)}
    return reputation_from_merge(
        nodes,
        accepted=[r.source for r in table if r.decision != REFUSED or r.source in insane],
        rejected=[(r.source, r.reason) for r in table if r.decision == REFUSED and r.source not in insane],
        clipped=[r.source for r in table if r.clipped],
        cosines={r.source: r.cosine for r in table if r.cosine is not None},
        dev_loss_ok={s: False for s in insane}, rule=rule)


def markdown_table(rows: Sequence[Screened | Mapping[str, Any]]) -> str:
    """The per-source table for asset metadata: every decision a user should see."""
    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| source | node | base weight | weight | cosine | norm | dev CER | decision |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (x if isinstance(x, Screened) else Screened(**x) for x in rows):
        decision = r.decision + (", norm clipped" if r.clipped else "") + (f": {r.reason}" if r.reason else "")
        lines.append(f"| {r.source} | {r.node_id or '–'} | {r.base_weight:.3g} | {r.weight:.3g} | "
                     f"{num(r.cosine, '.3f')} | {num(r.norm, '.3g')} | {num(r.dev_cer, '.3f')} | "
                     f"{decision.replace('|', '/')} |")
    return "\n".join(lines)


def train_reference_update(base_model_dir: str | os.PathLike[str], dataset_version_path: str | os.PathLike[str],
                           out_dir: str | os.PathLike[str], *, start_adapter: str | os.PathLike[str] | None = None,
                           samples: int = 64, hparams: Any = None, log: Callable[[str], None] | None = None,
                           **spec: Any):
    """The server's trusted reference update: ``train_adapter`` from ``start_adapter`` (the
    round's start; None: a fresh LoRA) on the root set -- the first ``samples`` samples of the
    dataset's training stream for ``hparams.seed``, which depends only
    on the seed, so every round's reference sees the same trusted rows (positions ``[0, samples)``
    of the stream, trained as one slice: ``AdapterJobSpec.segments``). ``spec``: further
    ``AdapterJobSpec`` fields (feature_cache_dir, rehearsal_dataset_path, device, timebox_s...).
    Returns the ``AdapterJobResult``; ``out_dir`` is then a checkpoint ``merge_candidate`` reads
    as ``reference`` (its result.json carries the dev CER baseline)."""
    from mloc_dagster.core.training.asr import train_adapter
    from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

    hp = hparams or AdapterHParams()
    if samples < 1:
        raise ValueError(f"a reference update needs at least one sample, got {samples}")
    spec = {"timebox_s": 3600.0, "checkpoint_every_s": 1e9, "node_id": "server-reference", **spec}
    return train_adapter(AdapterJobSpec(
        base_model_dir=base_model_dir, dataset_version_path=dataset_version_path, out_dir=out_dir,
        init_adapter=start_adapter, hparams=hp, segments=[(0, int(samples))], log=log, **spec))
