"""The evaluation gate a candidate adapter must pass before promotion (SPEC §5).

Four gates, all computed from per-utterance results (reference and hypothesis text):

- ``cer_gate`` / ``wer_gate``: the candidate's corpus CER / WER on the dialect's test split is at
  most the threshold. Corpus level means total edits / total reference length, so long
  utterances weigh more than short ones, as they do for listeners. The threshold is absolute
  (``max_cer`` / ``max_wer``) or, when ``max_cer_rel_base`` / ``max_wer_rel_base`` is set,
  relative: that fraction of the *base model's* CER / WER on the same test split (0.8: the
  candidate must make 20 % fewer errors than the model it adapts). A relative limit replaces the
  absolute one; it suits a dialect where the base starts far from any fixed target, and it is
  not moved by the candidate it judges;
- ``improvement_gate``: the candidate beats the production adapter with probability at least
  ``min_p_better``, estimated by a bootstrap over *speakers*: utterances of one speaker are
  correlated (voice, recording), so resampling utterances would overstate the evidence. The
  reference is the production adapter on the candidate's own base model or, when there is none,
  the base model itself. With fewer than ``min_test_speakers`` test speakers the gate fails with
  "insufficient evidence" instead of passing on a bootstrap of one or two speakers;
- ``regression_gate``: on the *base* dialect, the candidate's CER is at most
  ``max_base_regression_rel`` worse (relative) than the base model's -- adaptation must not
  break what already worked.

Counting errors and the bootstrap over speakers live in ``core/gates/scoring.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from mloc_dagster.core.gates.scoring import (
    BootstrapResult,
    Scores,
    SpeakerRow,
    UttResult,
    aligned,
    bootstrap_over_speakers,
    index_utts,
    score,
    score_with_counts,
)

GATE_NAMES = ("cer_gate", "wer_gate", "improvement_gate", "regression_gate")
# Comparisons allow this much float slack, so a value exactly at its threshold passes
# deterministically instead of depending on the last bit of a division.
_TOLERANCE = 1e-12
_EPS = 1e-9


class GateConfigError(ValueError):
    """A gate configuration the user must fix: the message names the file (or run config) and key."""


_INT_THRESHOLDS = {"bootstrap_samples", "seed", "min_test_speakers"}
_OPTIONAL_THRESHOLDS = {"max_cer_rel_base", "max_wer_rel_base"}


@dataclass(frozen=True)
class GateThresholds:
    max_cer: float = 0.15
    max_wer: float = 0.20
    min_p_better: float = 0.95
    max_base_regression_rel: float = 0.05
    bootstrap_samples: int = 2000
    seed: int = 0
    min_test_speakers: int = 5
    # Relative CER / WER limits: a fraction of the base model's error rate on the dialect's test
    # split. When set, they replace max_cer / max_wer.
    max_cer_rel_base: float | None = None
    max_wer_rel_base: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_cer", "max_wer", "max_base_regression_rel"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_cer_rel_base", "max_wer_rel_base"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (a fraction of the base model's error rate), got {value}")
        if not 0 <= self.min_p_better <= 1:
            raise ValueError(f"min_p_better must be within [0, 1], got {self.min_p_better}")
        if self.min_test_speakers < 1:
            raise ValueError(f"min_test_speakers must be >= 1, got {self.min_test_speakers}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None) -> GateThresholds:
        """Defaults with per-dialect overrides; an unknown key (likely a typo) or a value of the
        wrong type is a ``GateConfigError`` naming the key."""
        if not isinstance(overrides, Mapping | None):
            raise GateConfigError(f"expected an object of threshold: value, got {overrides!r}")
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GateConfigError(f"unknown gate thresholds {unknown}; known: {sorted(known)}")
        for key, value in overrides.items():
            if value is None and key in _OPTIONAL_THRESHOLDS:
                continue
            integer = key in _INT_THRESHOLDS
            if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
                raise GateConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        try:
            return cls(**overrides)
        except ValueError as exc:
            raise GateConfigError(str(exc)) from exc


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: float | None  # None when the gate had nothing to measure (no production adapter)
    threshold: float
    description: str


# --------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class GateReport:
    gates: tuple[GateResult, ...]
    candidate: Scores
    production: Scores | None
    base_candidate: Scores
    base_reference: Scores
    base_regression_rel: float
    speakers: tuple[SpeakerRow, ...]
    bootstrap: BootstrapResult | None
    thresholds: GateThresholds
    reference_label: str = "production"  # what the improvement gate compared with
    dialect_base: Scores | None = None  # the base model on the dialect's test split, when known

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def decision(self) -> str:
        return "passed" if self.passed else "failed"

    @property
    def reasons(self) -> list[str]:
        """Why it failed (one line per failed gate), or why it passed."""
        failed = [f"{g.name}: {g.description}" for g in self.gates if not g.passed]
        return failed or [f"{g.name}: {g.description}" for g in self.gates]

    def gate(self, name: str) -> GateResult:
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(name)

    def metrics(self) -> dict[str, float]:
        """Flat numbers to plot across materializations."""
        out = {
            "candidate_cer": self.candidate.cer,
            "candidate_wer": self.candidate.wer,
            "base_candidate_cer": self.base_candidate.cer,
            "base_reference_cer": self.base_reference.cer,
            "base_regression_rel": self.base_regression_rel,
            "n_test_utts": float(self.candidate.n_utts),
            "n_speakers": float(len(self.speakers)),
        }
        if self.production is not None:
            out["production_cer"] = self.production.cer
            out["production_wer"] = self.production.wer
        if self.bootstrap is not None:
            out["p_better"] = self.bootstrap.p_better
            out["cer_diff"] = self.bootstrap.diff
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "passed": self.passed,
            "reasons": self.reasons,
            "gates": [asdict(g) for g in self.gates],
            "candidate": self.candidate.to_dict(),
            "production": self.production.to_dict() if self.production else None,
            "base_candidate": self.base_candidate.to_dict(),
            "base_reference": self.base_reference.to_dict(),
            "base_regression_rel": self.base_regression_rel,
            "speakers": [asdict(s) for s in self.speakers],
            "bootstrap": asdict(self.bootstrap) if self.bootstrap else None,
            "thresholds": asdict(self.thresholds),
            "reference_label": self.reference_label,
            "dialect_base": self.dialect_base.to_dict() if self.dialect_base else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateReport:
        def scores(x: Mapping[str, Any] | None) -> Scores | None:
            return None if x is None else Scores(**{f.name: x[f.name] for f in fields(Scores)})

        base_candidate, base_reference, candidate = (scores(d[k]) for k in ("base_candidate", "base_reference",
                                                                            "candidate"))
        assert candidate is not None and base_candidate is not None and base_reference is not None
        return cls(
            gates=tuple(GateResult(**g) for g in d["gates"]),
            candidate=candidate,
            production=scores(d["production"]),
            base_candidate=base_candidate,
            base_reference=base_reference,
            base_regression_rel=d["base_regression_rel"],
            speakers=tuple(SpeakerRow(**s) for s in d["speakers"]),
            bootstrap=BootstrapResult(**d["bootstrap"]) if d["bootstrap"] else None,
            thresholds=GateThresholds(**d["thresholds"]),
            reference_label=d.get("reference_label", "production"),
            dialect_base=scores(d.get("dialect_base")),
        )

    @classmethod
    def from_json(cls, text: str) -> GateReport:
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        t = self.thresholds
        lines = [f"## Gate decision: **{self.decision.upper()}**", ""]
        lines += ["| gate | value | threshold | result |", "|---|---|---|---|"]
        bounds = {"cer_gate": "≤", "wer_gate": "≤", "improvement_gate": "≥", "regression_gate": "≤"}
        for g in self.gates:
            value = "n/a" if g.value is None else f"{g.value:.4f}"
            lines.append(f"| {g.name} | {value} | {bounds.get(g.name, '')} {g.threshold:.4f} | "
                         f"{'pass' if g.passed else '**FAIL**'} |")
        lines += ["", "**Reasons**", ""] + [f"- {r}" for r in self.reasons]

        lines += ["", "### Test split", ""]
        prod = self.production
        lines += ["| model | utts | CER | WER |", "|---|---|---|---|",
                  f"| candidate | {self.candidate.n_utts} | {self.candidate.cer:.4f} | {self.candidate.wer:.4f} |"]
        if prod is not None:
            lines.append(f"| {self.reference_label} | {prod.n_utts} | {prod.cer:.4f} | {prod.wer:.4f} |")
        base = self.dialect_base
        if base is not None and (prod is None or self.reference_label != "base model"):
            lines.append(f"| base model | {base.n_utts} | {base.cer:.4f} | {base.wer:.4f} |")
        lines.append("")
        if self.bootstrap is None:
            lines.append(f"{self.gate('improvement_gate').description}.")
        else:
            b = self.bootstrap
            lines.append(f"- bootstrap over {b.n_speakers} speakers, {b.samples} resamples (seed {b.seed}): "
                         f"P(candidate better) = **{b.p_better:.3f}** (needs ≥ {t.min_p_better:.2f})")
            lines.append(f"- CER difference candidate − {self.reference_label} = {b.diff:+.4f}, "
                         f"95 % interval [{b.ci_low:+.4f}, {b.ci_high:+.4f}]")

        lines += ["", "### Base dialect", ""]
        lines.append(f"Base model CER {self.base_reference.cer:.4f}, candidate CER {self.base_candidate.cer:.4f}: "
                     f"{100 * self.base_regression_rel:+.2f} % relative "
                     f"(limit +{100 * t.max_base_regression_rel:.1f} %).")

        lines += ["", "### Per speaker", "", f"| speaker | utts | CER candidate | CER {self.reference_label} |",
                  "|---|---|---|---|"]
        for s in self.speakers:
            prod_cer = "n/a" if s.cer_production is None else f"{s.cer_production:.4f}"
            lines.append(f"| {s.speaker} | {s.n_utts} | {s.cer_candidate:.4f} | {prod_cer} |")
        return "\n".join(lines) + "\n"


def _error_rate_gate(name: str, cand: Scores, absolute: float, relative: float | None,
                     base: Scores | None) -> GateResult:
    """The CER or WER gate, with an absolute limit or a fraction of the base model's rate."""
    what = name[:3].upper()
    value = cand.cer if what == "CER" else cand.wer
    if relative is None:
        limit, how = absolute, f"{absolute:.4f}"
    elif base is None:
        return GateResult(name, False, value, float("nan"),
                          f"candidate {what} {value:.4f}: the limit is {relative:.2f} × the base model's {what}, "
                          "but the base model's results on this test split were not given")
    else:
        base_value = base.cer if what == "CER" else base.wer
        limit = relative * base_value
        how = f"{limit:.4f} ({relative:.2f} × base model {base_value:.4f})"
    ok = value <= limit + _TOLERANCE
    return GateResult(name, ok, value, limit,
                      f"candidate {what} {value:.4f} {'≤' if ok else '>'} {how} on {cand.n_utts} test utterances")


def evaluate_gates(
    candidate: Sequence[UttResult],
    production: Sequence[UttResult] | None = None,
    *,
    base_candidate: Sequence[UttResult],
    base_reference: Sequence[UttResult],
    thresholds: GateThresholds | None = None,
    reference_label: str = "production",
    dialect_base: Sequence[UttResult] | None = None,
) -> GateReport:
    """Decide on a candidate.

    ``candidate`` / ``production``: the dialect's test split recognized by the candidate and by
    the reference -- the production adapter, or the base model (``reference_label`` names it;
    None: nothing to compare with, the gate passes on that ground). ``base_candidate`` /
    ``base_reference``: the base dialect's test split recognized by the candidate and by the
    base model. ``dialect_base``: the dialect's test split recognized by the base model, which
    relative CER / WER limits are fractions of; when it is not given and the reference is the
    base model (``reference_label == "base model"``), ``production`` is that. Paired sets must
    cover the same utterances.
    """
    t = thresholds or GateThresholds()
    index_utts(candidate, "candidate results")  # duplicates would count an utterance twice
    cand_scores, cand_edits, ref_len = score_with_counts(candidate)
    speakers = [r.speaker for r in candidate]
    if dialect_base is None and reference_label == "base model":
        dialect_base = production
    base_scores = None if dialect_base is None else score(aligned(candidate, dialect_base, "base-model results"))

    gates = [_error_rate_gate("cer_gate", cand_scores, t.max_cer, t.max_cer_rel_base, base_scores),
             _error_rate_gate("wer_gate", cand_scores, t.max_wer, t.max_wer_rel_base, base_scores)]

    prod_scores: Scores | None = None
    boot: BootstrapResult | None = None
    prod_edits: np.ndarray | None = None
    n_speakers = len(set(speakers))
    if n_speakers < t.min_test_speakers:
        gates.append(GateResult("improvement_gate", False, None, t.min_p_better,
                                f"insufficient evidence: {n_speakers} test speakers (the speaker bootstrap needs "
                                f"at least {t.min_test_speakers})"))
    if production is None:
        if n_speakers >= t.min_test_speakers:
            gates.append(GateResult("improvement_gate", True, None, t.min_p_better,
                                    f"no {reference_label} to compare with: passes on that ground"))
    else:
        prod_scores, prod_edits, _ = score_with_counts(aligned(candidate, production, "production results"))
        boot = bootstrap_over_speakers(speakers, cand_edits, prod_edits, ref_len, t.bootstrap_samples, t.seed)
        ok = boot.p_better >= t.min_p_better - _TOLERANCE
        if n_speakers >= t.min_test_speakers:
            gates.append(GateResult(
                "improvement_gate", ok, boot.p_better, t.min_p_better,
                f"P(candidate better than {reference_label}) = {boot.p_better:.3f} {'≥' if ok else '<'} "
                f"{t.min_p_better:.2f} "
                f"(CER {cand_scores.cer:.4f} vs {prod_scores.cer:.4f}, difference 95 % interval "
                f"[{boot.ci_low:+.4f}, {boot.ci_high:+.4f}] over {boot.n_speakers} speakers)",
            ))

    base_ref_scores = score(base_reference)
    base_cand_scores = score(aligned(base_reference, base_candidate, "base-dialect results"))
    regression = (base_cand_scores.cer - base_ref_scores.cer) / max(base_ref_scores.cer, _EPS)
    ok = regression <= t.max_base_regression_rel + _TOLERANCE
    gates.append(GateResult(
        "regression_gate", ok, regression, t.max_base_regression_rel,
        f"base-dialect CER {base_cand_scores.cer:.4f} vs base model {base_ref_scores.cer:.4f}: "
        f"{100 * regression:+.2f} % relative {'≤' if ok else '>'} {100 * t.max_base_regression_rel:.1f} %",
    ))

    rows = []
    for spk in sorted(set(speakers)):
        mask = np.array([s == spk for s in speakers])
        chars = int(ref_len[mask].sum())
        rows.append(SpeakerRow(
            speaker=spk,
            n_utts=int(mask.sum()),
            ref_chars=chars,
            cer_candidate=float(cand_edits[mask].sum() / max(chars, 1)),
            cer_production=None if prod_edits is None else float(prod_edits[mask].sum() / max(chars, 1)),
        ))

    return GateReport(
        gates=tuple(gates),
        candidate=cand_scores,
        production=prod_scores,
        base_candidate=base_cand_scores,
        base_reference=base_ref_scores,
        base_regression_rel=float(regression),
        speakers=tuple(rows),
        bootstrap=boot,
        thresholds=t,
        reference_label=reference_label,
        dialect_base=base_scores,
    )
