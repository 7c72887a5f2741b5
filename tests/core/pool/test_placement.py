"""Placement of a round's samples on nodes of different speeds, checked against brute force."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from mloc_dagster.core.pool.placement import (
    METHODS,
    NodeSpeed,
    PlacementError,
    eligible_nodes,
    optimal_makespan,
    place,
    place_and_take_quota,
)


def _nodes(*speeds: float) -> list[NodeSpeed]:
    return [NodeSpeed(f"n{i}", s) for i, s in enumerate(speeds)]


def _brute_force(speeds: list[float], costs: list[float]) -> float:
    """Every way of cutting the samples into len(speeds) contiguous (possibly empty) ranges, in order."""
    n, k = len(costs), len(speeds)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = np.inf
    for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max((prefix[b] - prefix[a]) / v for a, b, v in zip(bounds[:-1], bounds[1:], speeds)))
    return float(best)


def _check_valid(p, n: int, node_order: list[str]) -> None:
    assert p.n_samples == n
    assert p.shards[0].start == 0 and p.shards[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(p.shards[:-1], p.shards[1:]))  # contiguous, no gap
    assert all(s.samples > 0 for s in p.shards)
    assert [nid for nid in node_order if nid in set(p.node_ids)] == p.node_ids  # order kept
    assert p.makespan_s == pytest.approx(max(s.expected_s for s in p.shards))
    assert p.makespan_s >= p.lower_bound_s - 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_dp_is_optimal_on_small_cases_equal_costs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(30):
        k, n = int(rng.integers(1, 5)), int(rng.integers(1, 11))
        speeds = [float(x) for x in rng.uniform(1, 8, k).round(2)]
        nodes = _nodes(*speeds)
        best = _brute_force(speeds, [1.0] * n)
        dp = place(nodes, n, "dp")
        _check_valid(dp, n, [x.node_id for x in nodes])
        assert dp.makespan_s == pytest.approx(best, rel=1e-9)
        assert optimal_makespan(speeds, n) == pytest.approx(best, rel=1e-9)  # the closed form agrees
        greedy = place(nodes, n, "greedy")
        _check_valid(greedy, n, [x.node_id for x in nodes])
        # largest remainder: at most one sample above each node's proportional share
        assert best - 1e-9 <= greedy.makespan_s <= n / sum(speeds) + 1 / min(speeds) + 1e-9
        equal = place(nodes, n, "equal")
        _check_valid(equal, n, [x.node_id for x in nodes])
        assert equal.makespan_s >= best - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_dp_is_optimal_for_the_node_order_with_unequal_costs(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        k, n = int(rng.integers(1, 5)), int(rng.integers(1, 10))
        speeds = [float(x) for x in rng.uniform(1, 8, k).round(2)]
        costs = [float(x) for x in rng.lognormal(0, 0.6, n).round(3)]
        best = _brute_force(speeds, costs)
        for method in METHODS:
            p = place(_nodes(*speeds), n, method, costs=costs)
            _check_valid(p, n, [f"n{i}" for i in range(k)])
            assert p.makespan_s >= best - 1e-9
            if method == "dp":
                assert p.makespan_s == pytest.approx(best, rel=1e-9)


def test_large_round_dp_matches_closed_form_and_beats_the_others() -> None:
    rng = np.random.default_rng(7)
    speeds = [float(x) for x in rng.uniform(1, 8, 16)]
    n = 20_000
    dp, greedy, equal = (place(_nodes(*speeds), n, m) for m in METHODS)
    assert dp.makespan_s == pytest.approx(optimal_makespan(speeds, n), rel=1e-12)
    assert dp.makespan_s <= greedy.makespan_s + 1e-12 < equal.makespan_s
    assert greedy.makespan_s / dp.makespan_s < 1.01


def test_a_slow_node_can_be_left_idle() -> None:
    p = place(_nodes(100.0, 0.01), 3, "dp")
    assert p.node_ids == ["n0"] and p.idle == ("n1",)
    assert any("no samples" in w for w in p.warnings)


def test_parallelism_keeps_the_fastest_nodes_in_their_order() -> None:
    nodes = [NodeSpeed("c", 1.0), NodeSpeed("a", 4.0), NodeSpeed("b", 2.0), NodeSpeed("d", 4.0)]
    p = place(nodes, 100, "dp", parallelism=2)
    assert p.node_ids == ["a", "d"] and p.warnings == ()
    more = place(nodes, 100, "dp", parallelism=8)  # more slices than nodes: fewer slices, said so
    assert len(more.shards) == 4 and "only 4 node(s) available" in more.warnings[0]


@pytest.mark.parametrize(("nodes", "n", "kw", "match"), [
    ([], 10, {}, "no node available"),
    (_nodes(1.0, 0.0), 10, {}, "no usable throughput"),
    (_nodes(1.0, -2.0), 10, {}, "no usable throughput"),
    (_nodes(float("nan")), 10, {}, "no usable throughput"),
    ([NodeSpeed("a", None)], 10, {}, "calibrate it"),  # type: ignore[arg-type]
    ([NodeSpeed("a", 1.0), NodeSpeed("a", 2.0)], 10, {}, "listed twice"),
    (_nodes(1.0), 0, {}, "at least one sample"),
    (_nodes(1.0), -5, {}, "at least one sample"),
    (_nodes(1.0), 10, {"costs": [1.0] * 9}, "one number per sample"),
    (_nodes(1.0), 2, {"costs": [1.0, -1.0]}, "finite and >= 0"),
    (_nodes(1.0), 2, {"parallelism": 0}, "parallelism must be"),
    (_nodes(1.0), 2, {"method": "random"}, "unknown placement method"),
])
def test_bad_input_is_refused_clearly(nodes, n, kw, match) -> None:
    kw = dict(kw)
    method = kw.pop("method", "dp")
    with pytest.raises(PlacementError, match=match):
        place(nodes, n, method, **kw)
    if method == "dp" and nodes and n > 0 and not kw and match != "listed twice":
        with pytest.raises(PlacementError):
            optimal_makespan([x.samples_per_s for x in nodes], n)


# -- the pool ------------------------------------------------------------------------------------


@dataclass
class Rec:
    node_id: str
    last_seen_at: datetime | None
    speeds: dict = field(default_factory=dict)
    drained: bool = False
    jobs_today: int = 0
    jobs_day: str | None = None
    daily_quota: int | None = None

    def samples_per_s(self, base_model: str) -> float | None:
        return self.speeds.get(base_model)


def test_eligible_nodes_skips_drained_unseen_over_quota_and_uncalibrated() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    fresh = now - timedelta(seconds=30)
    records = [
        Rec("ok", fresh, {"bm": 5.0}),
        Rec("drained", fresh, {"bm": 5.0}, drained=True),
        Rec("stale", now - timedelta(seconds=121), {"bm": 5.0}),
        Rec("never", None, {"bm": 5.0}),
        Rec("full", fresh, {"bm": 5.0}, jobs_today=3, jobs_day="2025-03-01", daily_quota=3),
        Rec("yesterday", fresh, {"bm": 2.0}, jobs_today=10, jobs_day="2025-02-28"),  # a new day: quota back
        Rec("default-quota", fresh, {"bm": 5.0}, jobs_today=10, jobs_day="2025-03-01"),
        Rec("other-base", fresh, {"bm2": 5.0}),
    ]
    ok, skipped = eligible_nodes(records, "bm", now=now)
    assert ok == [NodeSpeed("ok", 5.0), NodeSpeed("yesterday", 2.0)]
    assert skipped["drained"] == "drained"
    assert "last seen 121 s ago" in skipped["stale"] and "never seen" in skipped["never"]
    assert "3/3" in skipped["full"] and "10/10" in skipped["default-quota"]
    assert "no throughput" in skipped["other-base"]
    ok_longer, _ = eligible_nodes(records, "bm", now=now, ttl_s=600)  # TTL is configurable
    assert [n.node_id for n in ok_longer] == ["ok", "stale", "yesterday"]


def test_place_and_take_quota_replaces_a_node_that_lost_its_last_slot() -> None:
    nodes = _nodes(4.0, 1.0, 2.0)
    taken, released = [], []

    def take(node_id: str) -> bool:
        taken.append(node_id)
        return node_id != "n2"  # n2's last slot went to someone else

    p = place_and_take_quota(nodes, 70, take, released.append)
    assert p.node_ids == ["n0", "n1"]
    assert sum(s.samples for s in p.shards) == 70
    assert "quota used up at placement: n2" in p.warnings[-1]
    assert taken.count("n0") == 1 and released == []  # a node keeps the quota it took, once


def test_place_and_take_quota_with_every_node_full() -> None:
    released: list[str] = []
    p = place_and_take_quota(_nodes(1.0, 1.0), 10, lambda nid: nid == "n0", released.append, parallelism=2)
    assert p.node_ids == ["n0"] and released == []
    with pytest.raises(PlacementError, match="no node available.*quota used up on n0, n1"):
        place_and_take_quota(_nodes(1.0, 1.0), 10, lambda nid: False, released.append)
    assert released == []
