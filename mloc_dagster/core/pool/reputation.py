"""How gate outcomes and per-adapter screening move a node's reputation (SPEC §5, issue 10).

Reputation is a number in [0, 1]; a new node starts at 1.0 and a node below ``TRUST_BAR`` (0.7)
only feeds *experimental* candidates. Every piece of evidence about a node is one exponential
moving-average step towards a target::

    reputation <- reputation + rate * (target - reputation)

``target`` says what the evidence is worth (1: as good as a trusted node, 0: worthless or
hostile), ``rate`` how much a single piece of evidence counts. The store applies a step in one
UPDATE (``NodeStore.apply_reputation_updates``), so concurrent merges and gates all count and the
value stays in [0, 1] without a clamp ever biting.

Evidence and its weight (the defaults in ``ReputationRule``):

============================================  =======================  ======================
evidence                                      target                   rate
============================================  =======================  ======================
adapter refused at a merge (non-finite,       0                        0.5 (one refusal takes
mis-shaped, wrong base or round, unsafe                                1.0 to 0.5: untrusted at
files)                                                                 once)
adapter accepted at a merge                   direction score d ∈[0,1] 0.3
  ... its norm had to be clipped              min(d, 0.5)              0.3
  ... its dev loss is not sane                0                        0.3
candidate passed its gate                     1                        0.1 × node's share
candidate failed its gate with evidence of    0                        0.05 × node's share
harm (``evidence_of_harm``)
candidate failed its gate without evidence    no change                --
of harm (only an absolute CER/WER limit, an
improvement not significant, too few
speakers), or no decision
============================================  =======================  ======================

Gate outcomes judge the model, not the node: a candidate that misses an absolute quality limit
(the tiny demo model cannot reach CER 0.15) while being better than what it started from says
nothing against the nodes that trained it. Only harm counts: the candidate is worse than what it
is compared with (production, or the base model) or than the base model on the dialect, or it
regressed on the base dialect (``regression_gate``). Screening refusals count at the merge.

The direction score is FLTrust's idea (Cao et al., NDSS 2021) with a margin: the cosine between
the node's update ΔW and a reference update the server trusts, mapped linearly from
``cos_floor`` = 0.05 (score 0) to ``cos_good`` = 0.25 (score 1) and clipped; with no reference
it is 1. The thresholds are measured (``bench/pool.py``, docs/pool.md): updates of LoRA slices
are high-dimensional and mostly sample-specific, so honest slices of 32–128 samples reach a
cosine of only 0.25–0.34 with a 64-sample reference (0.9 where their samples overlap the root
set), a slice trained on shuffled transcripts 0.12, random noise 0.00. A node's reputation tends
to its average score, so an honest node must score ≥ 0.7 on average (cosine ≥ 0.19) to stay
trusted. A node whose updates point elsewhere (noise, score 0) drops below 0.7 in two merges
(1.0 → 0.7 → 0.49) while an honest node with an occasional weak update recovers.
Gate outcomes move reputation slowly and in proportion to the node's share of the candidate's
adapters (a distributed round's adapter counts for the nodes inside it, by their merged samples:
``source_shares``): one bad candidate built by six nodes must not ruin all six, and a node that is below
the bar climbs back only through experimental candidates that pass their gate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

TRUST_BAR = 0.7


@dataclass(frozen=True, slots=True)
class ReputationUpdate:
    """One EMA step: ``reputation + rate * (target - reputation)``."""

    target: float
    rate: float
    reason: str

    def __post_init__(self) -> None:
        for name in ("target", "rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"reputation update {name} must be in [0, 1], got {value!r}")

    def apply(self, current: float) -> float:
        return min(1.0, max(0.0, current + self.rate * (self.target - current)))


@dataclass(frozen=True, slots=True)
class ReputationRule:
    refused_rate: float = 0.5
    screening_rate: float = 0.3
    cos_floor: float = 0.05  # direction score 0 at or below this cosine
    cos_good: float = 0.25  # direction score 1 at or above it (calibrated: bench/pool.py)
    clipped_cap: float = 0.5
    gate_pass_rate: float = 0.1
    gate_fail_rate: float = 0.05


DEFAULT_RULE = ReputationRule()


def direction_score(cosine: float | None, rule: ReputationRule = DEFAULT_RULE) -> float:
    """Cosine against the trusted reference update, mapped to [0, 1] (None: no reference, 1)."""
    if cosine is None:
        return 1.0
    if not math.isfinite(cosine):
        return 0.0
    return min(1.0, max(0.0, (cosine - rule.cos_floor) / (rule.cos_good - rule.cos_floor)))


def reputation_from_screening(*, refused: str | None = None, cosine: float | None = None, clipped: bool = False,
                              dev_loss_ok: bool = True, rule: ReputationRule = DEFAULT_RULE) -> ReputationUpdate:
    """The step for one adapter screened at a merge (``refused``: the reason it was refused)."""
    if refused:
        return ReputationUpdate(0.0, rule.refused_rate, f"refused: {refused}")
    if not dev_loss_ok:
        return ReputationUpdate(0.0, rule.screening_rate, "dev loss not sane")
    score = direction_score(cosine, rule)
    reason = "accepted" if cosine is None else f"accepted, cosine {cosine:.2f}"
    if clipped:
        score, reason = min(score, rule.clipped_cap), reason + ", norm clipped"
    return ReputationUpdate(score, rule.screening_rate, reason)


def reputation_from_merge(node_of: Mapping[str, str | None], *, accepted: Iterable[str] = (),
                          rejected: Iterable[tuple[str, str]] = (), clipped: Iterable[str] = (),
                          cosines: Mapping[str, float] | None = None, dev_loss_ok: Mapping[str, bool] | None = None,
                          rule: ReputationRule = DEFAULT_RULE) -> dict[str, ReputationUpdate]:
    """One step per node from a merge's screening (``core.merging.screening.reputation_updates`` maps a
    screened merge's per-source rows onto this: ``accepted`` sources (excluded ones included: their
    cosine says what they are worth), ``rejected`` as (source, reason), ``clipped`` sources),
    keyed by adapter source (its path) through ``node_of`` (source -> node id; adapters without a
    node are skipped).
    A node with several adapters in the merge gets the step of its worst one."""
    cosines, dev_loss_ok = cosines or {}, dev_loss_ok or {}
    clipped_set = set(clipped)
    steps: dict[str, ReputationUpdate] = {}

    def keep(source: str, update: ReputationUpdate) -> None:
        node = node_of.get(source)
        if not node:
            return
        worst = steps.get(node)
        if worst is None or (update.target, -update.rate) < (worst.target, -worst.rate):
            steps[node] = update

    for source, reason in rejected:
        keep(source, reputation_from_screening(refused=reason, rule=rule))
    for source in accepted:
        keep(source, reputation_from_screening(cosine=cosines.get(source), clipped=source in clipped_set,
                                               dev_loss_ok=dev_loss_ok.get(source, True), rule=rule))
    return steps


def node_shares(node_ids: Iterable[str | None]) -> dict[str, float]:
    """Each node's share of a candidate's adapters (a candidate's ``sources``' node ids)."""
    counts = Counter(n for n in node_ids if n)
    total = sum(counts.values())
    return {n: c / total for n, c in sorted(counts.items())}


def source_shares(contents: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each node's share of a candidate whose sources each contain one or more nodes: every
    source counts once and is split among its nodes in proportion to their amount (a chain job:
    ``{node: 1}``; a round adapter: ``{node: merged samples}``). A source without a node (``{}``)
    does not count, as in ``node_shares``."""
    contents = [c for c in contents if sum(v for v in c.values() if v > 0) > 0]
    out: dict[str, float] = {}
    for c in contents:
        total = sum(v for v in c.values() if v > 0)
        for node, amount in c.items():
            if amount > 0:
                out[node] = out.get(node, 0.0) + amount / total / len(contents)
    return dict(sorted(out.items()))


class GateOutcome(Protocol):
    """What ``evidence_of_harm`` reads of a ``core.gates.gate.GateReport``."""

    decision: str
    gates: Sequence[Any]
    candidate: Any
    production: Any
    dialect_base: Any
    reference_label: str


def evidence_of_harm(report: GateOutcome) -> list[str]:
    """Why a gated candidate did harm, or [] when it did none (it may still have failed the gate:
    an absolute CER/WER limit, an improvement that is not significant, too few test speakers)."""
    harm = [f"{g.name}: {g.description}" for g in report.gates if g.name == "regression_gate" and not g.passed]
    cer = report.candidate.cer
    if report.production is not None and cer > report.production.cer:
        harm.append(f"CER {cer:.4f} worse than {report.reference_label} {report.production.cer:.4f}")
    if report.dialect_base is not None and cer > report.dialect_base.cer and report.reference_label != "base model":
        harm.append(f"CER {cer:.4f} worse than the base model {report.dialect_base.cer:.4f}")
    return harm


def reputation_from_gate(decision: str, shares: Mapping[str, float], *, harm: Iterable[str] = (),
                         rule: ReputationRule = DEFAULT_RULE) -> dict[str, ReputationUpdate]:
    """The steps for every node of a gated candidate: ``decision`` is the gate report's
    (``passed`` / ``failed``; anything else moves nothing), ``shares`` each node's share of the
    candidate (``node_shares`` / ``source_shares``), ``harm`` what ``evidence_of_harm`` found.
    A passed gate steps towards 1; a failed one towards 0 only with evidence of harm: a failed
    gate without harm judged the model, not the nodes, and moves nothing."""
    if decision not in ("passed", "failed"):
        return {}
    harm = list(harm)
    if decision == "failed" and not harm:
        return {}
    target, rate = (1.0, rule.gate_pass_rate) if decision == "passed" else (0.0, rule.gate_fail_rate)
    why = f"gate {decision}" + (f" ({harm[0]})" if harm else "")
    out = {}
    for node_id, share in shares.items():
        if not (math.isfinite(share) and 0.0 <= share <= 1.0 + 1e-9):
            raise ValueError(f"node {node_id!r}: share {share!r} is not in [0, 1]")
        if share > 0:
            out[node_id] = ReputationUpdate(target, rate * min(share, 1.0), f"{why}, share {share:.2f}")
    return out
