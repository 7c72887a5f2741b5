"""The reputation rule: one EMA step per piece of evidence (no store, no Dagster)."""

from __future__ import annotations

import pytest

from mloc_dagster.core.gates.gate import GateReport, GateResult, GateThresholds
from mloc_dagster.core.gates.scoring import Scores
from mloc_dagster.core.pool.reputation import (
    TRUST_BAR,
    ReputationUpdate,
    direction_score,
    evidence_of_harm,
    node_shares,
    reputation_from_gate,
    reputation_from_merge,
    reputation_from_screening,
    source_shares,
)


def test_a_node_pointing_elsewhere_is_untrusted_within_two_merges_an_honest_one_stays() -> None:
    bad = good = 1.0
    for _ in range(2):
        bad = reputation_from_screening(cosine=-0.1).apply(bad)
        good = reputation_from_screening(cosine=0.6).apply(good)
    assert bad < TRUST_BAR <= good == 1.0
    weak_once = reputation_from_screening(cosine=0.15).apply(1.0)  # one weak update: still trusted
    assert TRUST_BAR < weak_once < 1.0


def test_screening_outcomes() -> None:
    assert reputation_from_screening(refused="mis-shaped").apply(1.0) == pytest.approx(0.5)
    assert reputation_from_screening(dev_loss_ok=False, cosine=0.9).target == 0.0
    assert reputation_from_screening(cosine=0.9, clipped=True).target == 0.5
    assert reputation_from_screening().target == 1.0  # no reference update: no direction evidence
    assert direction_score(float("nan")) == 0.0 and direction_score(0.15) == pytest.approx(0.5)


def test_gate_moves_nodes_in_proportion_to_their_share() -> None:
    shares = node_shares(["a", "a", "a", "b", None])
    assert shares == {"a": 0.75, "b": 0.25}
    passed = reputation_from_gate("passed", shares)
    assert passed["a"].apply(0.6) == pytest.approx(0.6 + 0.075 * 0.4)
    assert passed["b"].apply(0.6) == pytest.approx(0.6 + 0.025 * 0.4)
    harmed = reputation_from_gate("failed", shares, harm=["regression_gate: base-dialect CER +12 %"])
    assert harmed["a"].apply(1.0) == pytest.approx(1 - 0.05 * 0.75)
    assert reputation_from_gate("insufficient evidence", shares) == {}
    with pytest.raises(ValueError, match="share"):
        reputation_from_gate("passed", {"a": 1.5})


def test_a_round_adapter_shares_its_gate_among_the_nodes_inside_it() -> None:
    # A candidate of one chain job (node c) and one round adapter (a: 60 samples, b: 20).
    shares = source_shares([{"c": 1.0}, {"a": 60.0, "b": 20.0}, {}])
    assert shares == pytest.approx({"a": 0.375, "b": 0.125, "c": 0.5})
    assert source_shares([{"a": 1.0}, {"a": 1.0}, {"b": 1.0}]) == pytest.approx(node_shares(["a", "a", "b"]))


def _report(cer: float, *, base: float, production: float | None = None, regression_ok: bool = True,
            cer_ok: bool = False) -> GateReport:
    def scores(c: float) -> Scores:
        return Scores(n_utts=10, char_edits=round(c * 1000), ref_chars=1000, word_edits=5, ref_words=20)

    gates = (GateResult("cer_gate", cer_ok, cer, 0.15, f"CER {cer:.2f} vs 0.15"),
             GateResult("improvement_gate", False, 0.9, 0.95, "P(better) = 0.90 < 0.95"),
             GateResult("regression_gate", regression_ok, 0.01 if regression_ok else 0.2, 0.05, "base-dialect CER"))
    return GateReport(gates=gates, candidate=scores(cer), production=scores(production if production is not None
                                                                             else base),
                      base_candidate=scores(0.3), base_reference=scores(0.3), base_regression_rel=0.0, speakers=(),
                      bootstrap=None, thresholds=GateThresholds(),
                      reference_label="production" if production is not None else "base model",
                      dialect_base=scores(base))


def test_a_gate_judges_the_model_only_harm_lowers_reputation() -> None:
    shares = {"honest": 1.0}
    # The measured case: the tiny model misses CER 0.15 but beats the base model it started from.
    missed_the_limit = _report(0.55, base=0.60)
    assert missed_the_limit.decision == "failed" and evidence_of_harm(missed_the_limit) == []
    assert reputation_from_gate("failed", shares, harm=evidence_of_harm(missed_the_limit)) == {}
    worse_than_start = _report(0.65, base=0.60)
    assert evidence_of_harm(worse_than_start) == ["CER 0.6500 worse than base model 0.6000"]
    worse_than_production = _report(0.50, base=0.60, production=0.45)
    assert evidence_of_harm(worse_than_production) == ["CER 0.5000 worse than production 0.4500"]
    regressed = _report(0.50, base=0.60, regression_ok=False)
    assert evidence_of_harm(regressed) == ["regression_gate: base-dialect CER"]
    for harmful in (worse_than_start, worse_than_production, regressed):
        step = reputation_from_gate("failed", shares, harm=evidence_of_harm(harmful))["honest"]
        assert step.target == 0.0 and step.apply(1.0) == pytest.approx(0.95)


def test_updates_are_bounded() -> None:
    with pytest.raises(ValueError, match="rate"):
        ReputationUpdate(1.0, 1.5, "x")
    with pytest.raises(ValueError, match="target"):
        ReputationUpdate(float("nan"), 0.1, "x")
    assert ReputationUpdate(1.0, 1.0, "x").apply(0.2) == 1.0


def test_merge_screening_gives_each_node_the_step_of_its_worst_adapter() -> None:
    node_of = {"/a/1": "a", "/a/2": "a", "/b/1": "b", "/c/1": "c", "/x/1": None}
    steps = reputation_from_merge(node_of, accepted=["/a/1", "/b/1", "/c/1", "/x/1"],
                                  rejected=[("/a/2", "contains NaN or infinite values")], clipped=["/b/1"],
                                  cosines={"/c/1": -0.2})
    assert steps["a"].target == 0.0 and steps["a"].rate == 0.5 and "NaN" in steps["a"].reason
    assert steps["b"].target == 0.5 and "clipped" in steps["b"].reason
    assert steps["c"].target == 0.0 and set(steps) == {"a", "b", "c"}
    assert reputation_from_merge(node_of, accepted=["/a/1"])["a"].target == 1.0
