"""Placing one round of training on the pool: contiguous shard ranges sized by node throughput.

A round is N samples (indices ``0 .. N-1`` of the round's sample stream). Each node ``j`` that
takes part trains one contiguous range of them at its measured speed ``v_j`` (samples/s); the
round lasts as long as its slowest slice, ``makespan = max_j cost(range_j) / v_j``. Placement
picks the ranges.

- ``place_dp`` is **exact**: the linear-partition dynamic programme over the given node order,
  ``f_j(i) = min_l max(f_{j-1}(l), cost(l, i) / v_j)``. ``f_{j-1}`` grows with ``l`` and the last
  slice's time shrinks with it, so the best ``l`` is where they cross, found by binary search for
  all ``i`` at once: O(k · N log N) with numpy. With per-sample ``costs`` (e.g. audio durations)
  the node order matters and the optimum is over that fixed order -- choosing the order too is
  NP-complete (Pinar, Tabak & Aykanat, JPDC 2008). With equal-cost samples the order does not
  matter and the result is the global optimum, equal to ``optimal_makespan`` (closed form).
- ``place_greedy``: throughput-proportional shares, rounded by largest remainder (equal costs) or
  cut where the cost prefix reaches each node's proportional share (``costs``). O(k + N); within
  about one sample per node of the optimum.
- ``place_equal``: the same number of samples on every node -- the baseline a speed-blind
  scheduler gets.

Which nodes may take part is the registry's business (``eligible_nodes`` filters registry records:
drained, unseen, over quota, no throughput for the base model), and quotas are taken at placement
(``place_and_take_quota``). No Dagster imports.

Bad input raises ``PlacementError``: no node, a throughput that is not a positive finite number,
a duplicate node id, a round of fewer than one sample, costs of the wrong length or negative.
Asking for more slices (``parallelism``) than nodes are available is not an error: the round
gets fewer slices and the placement says so in ``warnings``. A node may end up with no samples
(it would only make the round longer): it gets no slice and is listed in ``idle``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np

from mloc_dagster.core.pool.ray_cluster import RayNode, ray_unavailable_reason

METHODS = ("dp", "greedy", "equal")
DEFAULT_TTL_S = 120.0
DEFAULT_DAILY_QUOTA = 10


class PlacementError(ValueError):
    """The round cannot be placed as asked (says why)."""


@dataclass(frozen=True, slots=True)
class NodeSpeed:
    node_id: str
    samples_per_s: float


@dataclass(frozen=True, slots=True)
class Shard:
    """Samples ``start .. stop-1`` of the round on ``node_id``."""

    node_id: str
    start: int
    stop: int
    samples_per_s: float
    expected_s: float  # cost of the range / samples_per_s

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Placement:
    method: str
    n_samples: int
    shards: tuple[Shard, ...]
    makespan_s: float  # the slowest slice's expected time
    lower_bound_s: float  # total cost / total speed: no placement can beat it
    idle: tuple[str, ...] = ()  # available nodes given no samples
    warnings: tuple[str, ...] = field(default=())

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = [{**asdict(s), "samples": s.samples} for s in self.shards]
        return out


# --------------------------------------------------------------------------- placement


def place(nodes: Sequence[NodeSpeed], n_samples: int, method: str = "dp", *,
          costs: Sequence[float] | np.ndarray | None = None, parallelism: int | None = None) -> Placement:
    """Place ``n_samples`` on ``nodes`` (in this order) with ``method`` (``dp``, ``greedy``, ``equal``).

    ``parallelism`` caps the number of slices: the fastest nodes are kept (ties by node id), in
    their given order; fewer available nodes than asked gives fewer slices and a warning.
    ``costs`` (optional, one non-negative number per sample, in units of an average sample) makes
    samples unequal, e.g. by audio duration.
    """
    if method not in METHODS:
        raise PlacementError(f"unknown placement method {method!r}; one of {', '.join(METHODS)}")
    speeds = _check_nodes(nodes)
    _check_n(n_samples)
    prefix = _prefix(costs, n_samples)
    warnings: list[str] = []
    chosen = list(nodes)
    if parallelism is not None:
        if parallelism < 1:
            raise PlacementError(f"parallelism must be >= 1, got {parallelism}")
        if parallelism > len(chosen):
            warnings.append(f"parallelism {parallelism} asked but only {len(chosen)} node(s) available: "
                            f"{len(chosen)} slice(s)")
        else:
            keep = {n.node_id for n in sorted(chosen, key=lambda n: (-n.samples_per_s, n.node_id))[:parallelism]}
            chosen = [n for n in chosen if n.node_id in keep]
        speeds = np.array([n.samples_per_s for n in chosen], dtype=np.float64)
    if method == "dp":
        counts = _dp_counts(speeds, prefix)
    elif method == "greedy":
        counts = _greedy_counts(speeds, prefix, unit=costs is None)
    else:
        counts = _equal_counts(len(chosen), n_samples)
    return _placement(method, chosen, counts, prefix, warnings)


def place_dp(nodes: Sequence[NodeSpeed], n_samples: int, **kw: Any) -> Placement:
    return place(nodes, n_samples, "dp", **kw)


def place_greedy(nodes: Sequence[NodeSpeed], n_samples: int, **kw: Any) -> Placement:
    return place(nodes, n_samples, "greedy", **kw)


def place_equal(nodes: Sequence[NodeSpeed], n_samples: int, **kw: Any) -> Placement:
    return place(nodes, n_samples, "equal", **kw)


def optimal_makespan(speeds: Sequence[float], n_samples: int) -> float:
    """The exact optimum for equal-cost samples, independent of the DP: the smallest ``T`` with
    ``sum_j floor(T * v_j) >= N``. Start from the fluid bound ``T0 = N / sum v`` (where the floors
    fall at most k short) and hand the missing samples out one by one to the node that would
    finish its next sample first."""
    v = _check_nodes([NodeSpeed(str(i), s) for i, s in enumerate(speeds)])
    _check_n(n_samples)
    counts = np.floor(n_samples * v / v.sum() * (1 - 1e-12)).astype(np.int64)
    heap = [((int(c) + 1) / s, j) for j, (c, s) in enumerate(zip(counts, v))]
    heapq.heapify(heap)
    for _ in range(n_samples - int(counts.sum())):
        _, j = heapq.heappop(heap)
        counts[j] += 1
        heapq.heappush(heap, ((int(counts[j]) + 1) / v[j], j))
    return float(max(c / s for c, s in zip(counts, v) if c > 0))


def _check_nodes(nodes: Sequence[NodeSpeed]) -> np.ndarray:
    if not nodes:
        raise PlacementError("no node available to place the round on")
    seen: set[str] = set()
    for n in nodes:
        if n.node_id in seen:
            raise PlacementError(f"node {n.node_id!r} listed twice")
        seen.add(n.node_id)
        s = n.samples_per_s
        if s is None or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise PlacementError(f"node {n.node_id!r} has no usable throughput ({s!r} samples/s); "
                                 "calibrate it (`mloc node calibrate`) or leave it out")
    return np.array([float(n.samples_per_s) for n in nodes], dtype=np.float64)


def _check_n(n_samples: int) -> None:
    if not isinstance(n_samples, int | np.integer) or isinstance(n_samples, bool) or n_samples < 1:
        raise PlacementError(f"a round needs at least one sample to place, got {n_samples!r}")


def _prefix(costs: Sequence[float] | np.ndarray | None, n_samples: int) -> np.ndarray:
    """Cumulative cost ``P[i]`` of samples ``0 .. i-1`` (length N+1)."""
    if costs is None:
        return np.arange(n_samples + 1, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (n_samples,):
        raise PlacementError(f"costs must give one number per sample: {n_samples} samples, {c.size} costs")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise PlacementError("sample costs must be finite and >= 0")
    return np.concatenate([[0.0], np.cumsum(c)])


def _dp_counts(v: np.ndarray, prefix: np.ndarray) -> list[int]:
    """Linear partition over the fixed node order (module docstring); returns samples per node."""
    n, k = len(prefix) - 1, len(v)
    f = np.full(n + 1, np.inf)
    f[0] = 0.0  # zero nodes can place zero samples
    cut = np.zeros((k, n + 1), dtype=np.int64)
    idx = np.arange(n + 1)
    for j in range(k):
        # smallest l with f(l) >= (P[i] - P[l]) / v_j, i.e. f(l) + P[l]/v_j >= P[i]/v_j (non-decreasing in l)
        h = f + prefix / v[j]
        hi = np.minimum(np.searchsorted(h, prefix / v[j], side="left"), idx)
        lo = np.maximum(hi - 1, 0)
        val_hi = np.maximum(f[hi], (prefix - prefix[hi]) / v[j])
        val_lo = np.maximum(f[lo], (prefix - prefix[lo]) / v[j])
        take_lo = val_lo < val_hi
        cut[j] = np.where(take_lo, lo, hi)
        f = np.where(take_lo, val_lo, val_hi)
    counts, i = [0] * k, n
    for j in range(k - 1, -1, -1):
        start = int(cut[j, i])
        counts[j], i = i - start, start
    assert i == 0, "linear partition did not cover the round"
    return counts


def _greedy_counts(v: np.ndarray, prefix: np.ndarray, *, unit: bool) -> list[int]:
    n = len(prefix) - 1
    share = v / v.sum()
    if unit:  # largest remainder (Hamilton): floors, then the biggest fractions get one more
        quota = n * share
        counts = np.floor(quota).astype(np.int64)
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[: n - int(counts.sum())]] += 1
        return [int(c) for c in counts]
    # cut where the cost prefix is nearest each node's cumulative proportional share
    targets = np.cumsum(share)[:-1] * prefix[-1]
    right = np.clip(np.searchsorted(prefix, targets, side="left"), 1, n)
    nearer_left = (targets - prefix[right - 1]) < (prefix[right] - targets)
    cuts = np.maximum.accumulate(np.where(nearer_left, right - 1, right))
    bounds = np.concatenate([[0], cuts, [n]])
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _equal_counts(k: int, n: int) -> list[int]:
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def _placement(method: str, nodes: Sequence[NodeSpeed], counts: Sequence[int], prefix: np.ndarray,
               warnings: list[str]) -> Placement:
    shards, idle, start = [], [], 0
    for node, c in zip(nodes, counts):
        if c == 0:
            idle.append(node.node_id)
            continue
        stop = start + c
        shards.append(Shard(node.node_id, start, stop, float(node.samples_per_s),
                            float(prefix[stop] - prefix[start]) / node.samples_per_s))
        start = stop
    n = len(prefix) - 1
    assert start == n, f"placement covers {start} of {n} samples"
    if idle:
        warnings.append(f"{len(idle)} node(s) given no samples (they would only lengthen the round): "
                        f"{', '.join(idle)}")
    total_speed = sum(float(x.samples_per_s) for x in nodes)
    return Placement(method, n, tuple(shards), max(s.expected_s for s in shards), float(prefix[-1]) / total_speed,
                     tuple(idle), tuple(warnings))


# --------------------------------------------------------------------------- the pool


class NodeLike(Protocol):
    """What ``eligible_nodes`` reads of a registry record (``core.state.NodeRecord``)."""

    node_id: str
    drained: bool
    last_seen_at: datetime | None
    jobs_today: int
    jobs_day: str | None
    daily_quota: int | None

    def samples_per_s(self, base_model: str) -> float | None: ...


def unavailable_reason(record: NodeLike, *, now: datetime, ttl_s: float = DEFAULT_TTL_S,
                       default_quota: int = DEFAULT_DAILY_QUOTA, ray: Mapping[str, RayNode] | None = None
                       ) -> str | None:
    """Why the node may take no new job now (drained, not alive, daily quota used up -- the day is
    ``now``'s UTC date), or None when it may. Alive: in Ray's node table when the pool is a Ray
    cluster (``ray``, ``core/pool/ray_cluster.py``), else seen within ``ttl_s``."""
    limit = default_quota if record.daily_quota is None else record.daily_quota
    taken = record.jobs_today if record.jobs_day == now.date().isoformat() else 0
    if record.drained:
        return "drained"
    if ray is not None:
        dead = ray_unavailable_reason(record.node_id, ray)
        if dead is not None:
            return dead
    elif record.last_seen_at is None:
        return f"unavailable: never seen (TTL {ttl_s:.0f} s)"
    elif now - record.last_seen_at > timedelta(seconds=ttl_s):
        return f"unavailable: last seen {(now - record.last_seen_at).total_seconds():.0f} s ago (TTL {ttl_s:.0f} s)"
    if taken >= limit:
        return f"daily quota used: {taken}/{limit} jobs today"
    return None


def eligible_nodes(records: Iterable[NodeLike], base_model: str, *, now: datetime, ttl_s: float = DEFAULT_TTL_S,
                   default_quota: int = DEFAULT_DAILY_QUOTA, ray: Mapping[str, RayNode] | None = None
                   ) -> tuple[list[NodeSpeed], dict[str, str]]:
    """The nodes a round on ``base_model`` may use now, in node-id order, and why the others may not:
    ``unavailable_reason``, or no measured throughput for this base model (calibrate it first)."""
    ok, skipped = [], {}
    for r in sorted(records, key=lambda r: r.node_id):
        speed = r.samples_per_s(base_model)
        reason = unavailable_reason(r, now=now, ttl_s=ttl_s, default_quota=default_quota, ray=ray)
        if reason is None and (speed is None or not math.isfinite(speed) or speed <= 0):
            reason = f"no throughput measured for base model {base_model[:12]}"
        if reason is None:
            ok.append(NodeSpeed(r.node_id, float(speed)))
        else:
            skipped[r.node_id] = reason
    return ok, skipped


def place_and_take_quota(nodes: Sequence[NodeSpeed], n_samples: int, take_quota: Callable[[str], bool],
                         release_quota: Callable[[str], object], method: str = "dp", *,
                         costs: Sequence[float] | np.ndarray | None = None,
                         parallelism: int | None = None) -> Placement:
    """Place the round and take one job of daily quota from every node that got a slice.

    ``take_quota`` is the store's atomic conditional update (``NodeStore.take_job_quota``): a node
    that lost the race for its last slot is dropped and the round is placed again on the rest;
    nodes that took quota but get no slice in the new placement give it back (``release_quota``).
    Raises ``PlacementError`` when no node is left.
    """
    pool = list(nodes)
    holding: set[str] = set()
    refused: list[str] = []
    while True:
        if not pool:
            for node_id in holding:
                release_quota(node_id)
            raise PlacementError("no node available to place the round on"
                                 + (f" (quota used up on {', '.join(refused)})" if refused else ""))
        placement = place(pool, n_samples, method, costs=costs, parallelism=parallelism)
        wanted = set(placement.node_ids)
        lost = [nid for nid in placement.node_ids if nid not in holding and not _take(take_quota, nid, holding)]
        if not lost:
            for node_id in holding - wanted:
                release_quota(node_id)
            if refused:
                placement = Placement(placement.method, placement.n_samples, placement.shards, placement.makespan_s,
                                      placement.lower_bound_s, placement.idle,
                                      (*placement.warnings, f"quota used up at placement: {', '.join(refused)}"))
            return placement
        refused.extend(lost)
        pool = [n for n in pool if n.node_id not in lost]


def _take(take_quota: Callable[[str], bool], node_id: str, holding: set[str]) -> bool:
    if take_quota(node_id):
        holding.add(node_id)
        return True
    return False
