"""The reputation rule: one EMA step per piece of evidence (no store, no Dagster)."""

from __future__ import annotations

import pytest

from mloc_dagster.core.reputation import (
    TRUST_BAR,
    ReputationUpdate,
    direction_score,
    node_shares,
    reputation_from_gate,
    reputation_from_merge,
    reputation_from_screening,
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
    failed = reputation_from_gate("failed", shares)
    assert failed["a"].apply(1.0) == pytest.approx(1 - 0.05 * 0.75)
    assert reputation_from_gate("insufficient evidence", shares) == {}
    lacking = ["improvement_gate: insufficient evidence: 2 test speakers (the speaker bootstrap needs at least 5)"]
    assert reputation_from_gate("failed", shares, failure_reasons=lacking) == {}
    both = [*lacking, "cer_gate: CER 0.40 > 0.15"]
    assert set(reputation_from_gate("failed", shares, failure_reasons=both)) == {"a", "b"}
    with pytest.raises(ValueError, match="share"):
        reputation_from_gate("passed", {"a": 1.5})


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
