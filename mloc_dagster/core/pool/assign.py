"""Placing work on the pool as the node registry (and, on a Ray pool, Ray's node table) sees it now:
a round's slices (``place_on_pool``) and a chained job (``place_job``). The rounds sensor, the
training chain and the Ray run launcher (``execution/ray.py``: a job whose node died) all place
through here, so one rule decides which nodes may take work."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from mloc_dagster.core.pool.placement import Placement, PlacementError, eligible_nodes, place_and_take_quota
from mloc_dagster.core.pool.ray_cluster import RayUnreachable, pool_ray_table, ray_pool, ray_unavailable_reason
from mloc_dagster.core.pool.rounds import base_model_hash
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.nodes import default_daily_quota, node_ttl_s
from mloc_dagster.core.state.rounds import RoundSlice
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import QUEUED


def place_on_pool(store: StateStore, run: TrainingRun, n_samples: int, *, parallelism: int,
                  exclude: set[str] = frozenset()) -> Placement:
    """``n_samples`` of ``run`` placed on the available nodes (quota taken), or ``PlacementError``
    naming why each node was skipped."""
    try:
        ray = pool_ray_table()  # on a Ray cluster, whether a node is up is Ray's answer
    except RayUnreachable as exc:
        raise PlacementError(str(exc)) from exc
    nodes, skipped = eligible_nodes(store.list_nodes(), base_model_hash(run.base_model_version),
                                    now=datetime.now(UTC), ttl_s=node_ttl_s(), default_quota=default_daily_quota(),
                                    ray=ray)
    nodes = [n for n in nodes if n.node_id not in exclude]
    if not nodes:
        why = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "the node registry is empty"
        raise PlacementError(f"no node available ({why})")
    return place_and_take_quota(nodes, n_samples, store.take_job_quota, store.release_job_quota,
                                parallelism=parallelism)


def place_job(store: StateStore, run: TrainingRun, exclude: set[str] = frozenset()) -> str | None:
    """The node a chained job runs on when the pool is a Ray cluster: the fastest available one
    (Ray-alive, not drained, quota left: one job of quota taken); None off Ray, where a job runs
    where its run worker starts. ``PlacementError`` when no node is available."""
    if not ray_pool():
        return None
    return place_on_pool(store, run, 1, parallelism=1, exclude=exclude).shards[0].node_id


def waiting_on_gone_nodes(slices: Sequence[RoundSlice]) -> list[tuple[RoundSlice, str]]:
    """Slices still waiting to start (queued) on a node a Ray pool no longer has alive (dead, or gone
    from the cluster), with why: their Ray job would wait for a resource no node offers, until run
    monitoring's start timeout, for each of Dagster's retries (docs/pool.md). Off Ray, or while Ray
    does not answer, none: a slice waiting its turn says nothing about its node there."""
    waiting = [s for s in slices if s.status == QUEUED]
    if not waiting or not ray_pool():
        return []
    try:
        table = pool_ray_table()
    except RayUnreachable:
        return []
    return [(s, f"node {s.node_id} {why}") for s in waiting if (why := ray_unavailable_reason(s.node_id, table))]
