"""The node registry on SQLite and on a real PostgreSQL (``state_url`` from tests/conftest_pg.py)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from mloc_dagster.core.pool.placement import NodeSpeed, eligible_nodes, place_and_take_quota, unavailable_reason
from mloc_dagster.core.pool.reputation import ReputationUpdate, node_shares, reputation_from_gate, reputation_from_screening
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.nodes import DeviceInfo, InvalidNodeId, canonical_node_id
from tests.core.conftest import FakeClock


def _jobs_today(store: StateStore, node_id: str) -> int:
    return store.get_node(node_id).jobs_taken(store._clock().date().isoformat())


GPU = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", "GPU-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab", 81559)


def test_heartbeat_registers_a_node_and_never_moves_back(store: StateStore, clock: FakeClock) -> None:
    assert store.find_node("gpu-1") is None
    fresh = store.get_node("gpu-1")
    assert (fresh.reputation, fresh.last_seen_at, fresh.drained, fresh.throughput) == (1.0, None, False, {})
    rec = store.heartbeat_node("gpu-1", host="worker-1", device=GPU)
    assert rec.host == "worker-1" and rec.device == GPU and rec.device.describe() == "NVIDIA H100 80GB HBM3, 80 GiB"
    assert rec.last_seen_at == clock.now and rec.registered_at == clock.now
    first = clock.now
    clock.advance(30)
    assert store.heartbeat_node("gpu-1").last_seen_at == clock.now  # host/device kept when not given
    assert store.get_node("gpu-1").device == GPU and store.get_node("gpu-1").host == "worker-1"
    late = store.heartbeat_node("gpu-1", seen_at=first)  # a delayed heartbeat does not rewind liveness
    assert late.last_seen_at == clock.now and late.registered_at == first
    store.heartbeat_node("cpu-1", device=DeviceInfo("cpu"))
    assert [n.node_id for n in store.list_nodes()] == ["cpu-1", "gpu-1"]
    assert store.get_node("cpu-1").device.describe() == "CPU"


def test_a_node_unseen_longer_than_the_ttl_is_unavailable(store: StateStore, clock: FakeClock) -> None:
    store.heartbeat_node("n1")
    store.record_job_throughput("n1", "bm", 40.0)
    clock.advance(120)
    assert unavailable_reason(store.get_node("n1"), now=clock.now) is None
    clock.advance(1)
    assert "last seen 121 s ago" in unavailable_reason(store.get_node("n1"), now=clock.now)
    assert unavailable_reason(store.get_node("n1"), now=clock.now, ttl_s=300) is None
    assert store.get_node("n1").to_json(clock.now, ttl_s=300)["unavailable"] is None


def test_throughput_per_base_model_calibration_then_jobs(store: StateStore, clock: FakeClock) -> None:
    store.record_job_throughput("n1", "bm-a", 100.0, source="calibrate")
    assert store.get_node("n1").samples_per_s("bm-a") == 100.0
    assert store.get_node("n1").samples_per_s("bm-b") is None
    clock.advance(60)
    rec = store.record_job_throughput("n1", "bm-a", 60.0, seen_at=clock.now)  # a slow job lowers it at once
    assert rec.samples_per_s("bm-a") == pytest.approx(80.0)
    assert rec.throughput["bm-a"]["jobs"] == 1 and rec.throughput["bm-a"]["source"] == "job"
    assert rec.last_seen_at == clock.now  # a job's report is a heartbeat too
    store.record_job_throughput("n1", "bm-b", 10.0, host="worker-9", device=GPU)  # another base: taken as is
    assert store.get_node("n1").host == "worker-9" and store.get_node("n1").device == GPU
    rec = store.record_job_throughput("n1", "bm-a", 90.0, source="calibrate")
    assert (rec.samples_per_s("bm-a"), rec.samples_per_s("bm-b")) == (90.0, 10.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            store.record_job_throughput("n1", "bm-a", bad)
    with pytest.raises(ValueError, match="base model"):
        store.record_job_throughput("n1", "", 10.0)


def test_quota_default_override_drain_and_day_rollover(store: StateStore, clock: FakeClock, monkeypatch) -> None:
    monkeypatch.setenv("MLOC_NODE_DAILY_QUOTA", "3")
    assert [store.take_job_quota("n1") for _ in range(4)] == [True, True, True, False]
    assert _jobs_today(store, "n1") == 3
    store.set_node_quota("n1", 5)
    assert [store.take_job_quota("n1") for _ in range(3)] == [True, True, False]
    store.release_job_quota("n1")  # placed, then dropped before launch
    assert _jobs_today(store, "n1") == 4 and store.take_job_quota("n1")
    store.set_node_drained("n1", True, "disk failing")
    assert store.get_node("n1").drained_reason == "disk failing"
    clock.advance(3600)  # past UTC midnight: a new day, but drained
    assert _jobs_today(store, "n1") == 0 and not store.take_job_quota("n1")
    assert unavailable_reason(store.get_node("n1"), now=clock.now) == "drained"
    rec = store.set_node_drained("n1", False)
    assert not rec.drained and rec.drained_reason is None
    assert store.take_job_quota("n1") and _jobs_today(store, "n1") == 1
    store.set_node_quota("n2", 0)  # a node that may take nothing
    assert not store.take_job_quota("n2")
    store.set_node_quota("n1", None)  # back to the default (3)
    assert store.get_node("n1").daily_quota is None
    with pytest.raises(ValueError, match="jobs >= 0"):
        store.set_node_quota("n1", -1)


def test_two_jobs_racing_for_the_last_slots_cannot_both_get_one(state_url: str, clock: FakeClock) -> None:
    with StateStore(state_url, clock=clock) as s:
        s.set_node_quota("n1", 5)
    stores = [StateStore(state_url, clock=clock) for _ in range(6)]
    barrier, got = threading.Barrier(len(stores)), []

    def worker(s: StateStore) -> None:
        barrier.wait()
        got.extend(s.take_job_quota("n1") for _ in range(3))

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got.count(True) == 5 and len(got) == 18
    assert _jobs_today(stores[0], "n1") == 5
    for s in stores:
        s.close()


def test_reputation_updates_are_atomic_and_none_is_lost(state_url: str, clock: FakeClock) -> None:
    stores = [StateStore(state_url, clock=clock) for _ in range(4)]
    step = ReputationUpdate(0.0, 0.1, "test")
    barrier = threading.Barrier(len(stores))

    def worker(s: StateStore) -> None:
        barrier.wait()
        for _ in range(5):
            s.apply_reputation_updates({"n1": step, "n2": step})

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # 20 identical EMA steps towards 0 in any order: 0.9 ** 20
    assert stores[0].node_reputation("n1") == pytest.approx(0.9 ** 20)
    assert stores[0].node_reputation("n2") == pytest.approx(0.9 ** 20)
    for s in stores:
        s.close()


def test_gate_and_screening_move_reputation_through_the_store(store: StateStore) -> None:
    refused = reputation_from_screening(refused="contains NaN or infinite values")
    assert store.apply_reputation_updates({"bad": refused}) == {"bad": pytest.approx(0.5)}
    shares = node_shares(["good", "good", "bad", None])
    new = store.apply_reputation_updates(reputation_from_gate("passed", shares))
    assert new["good"] == 1.0 and new["bad"] == pytest.approx(0.5 + 0.1 / 3 * 0.5)


def test_placement_from_registry_records_takes_quota(store: StateStore, clock: FakeClock) -> None:
    for node, speed in (("fast", 80.0), ("slow", 20.0), ("mid", 40.0), ("away", 80.0), ("off", 80.0)):
        store.heartbeat_node(node)
        store.record_job_throughput(node, "bm", speed, source="calibrate")
    store.set_node_drained("off", True)
    store.set_node_quota("slow", 1)
    clock.advance(100)
    for node in ("fast", "slow", "mid", "off"):
        store.heartbeat_node(node)
    clock.advance(30)  # "away" last seen 130 s ago
    ok, skipped = eligible_nodes(store.list_nodes(), "bm", now=clock.now)
    assert ok == [NodeSpeed("fast", 80.0), NodeSpeed("mid", 40.0), NodeSpeed("slow", 20.0)]
    assert set(skipped) == {"away", "off"}
    first = place_and_take_quota(ok, 1400, store.take_job_quota, store.release_job_quota)
    assert [(s.node_id, s.samples) for s in first.shards] == [("fast", 800), ("mid", 400), ("slow", 200)]
    assert _jobs_today(store, "slow") == 1
    ok, skipped = eligible_nodes(store.list_nodes(), "bm", now=clock.now)  # slow's quota (1) is used
    assert [n.node_id for n in ok] == ["fast", "mid"] and "1/1" in skipped["slow"]


def test_node_ids_are_validated_on_registry_writes(store: StateStore) -> None:
    for bad in ("Worker-1", "host.example.org", "-x", "a_b", "", "x" * 129):
        with pytest.raises(InvalidNodeId, match="lowercase"):
            store.heartbeat_node(bad)
    with pytest.raises(InvalidNodeId, match="'host-example-org'"):
        store.take_job_quota("host.example.org")
    assert canonical_node_id("Worker_3.Lab") == "worker-3-lab"
    assert canonical_node_id("vm-GPU-0b1c2d3e") == "vm-gpu-0b1c2d3e"
    assert store.list_nodes() == []


def test_an_old_nodes_table_is_migrated_in_place(state_url: str) -> None:
    """A store from before the registry: the nodes table had 5 columns; its rows keep working."""
    old = sa.MetaData()
    sa.Table("nodes", old, sa.Column("node_id", sa.String(128), primary_key=True),
             sa.Column("reputation", sa.Float, nullable=False), sa.Column("jobs_today", sa.Integer, nullable=False),
             sa.Column("jobs_day", sa.String(10)), sa.Column("updated_at", sa.DateTime))
    engine = sa.create_engine(state_url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO nodes (node_id, reputation, jobs_today, jobs_day) "
                             "VALUES ('legacy', 0.4, 2, '2025-03-01')"))
    engine.dispose()
    with StateStore(state_url) as s:
        assert {"nodes.throughput", "nodes.last_seen_at", "nodes.daily_quota", "nodes.drained"} <= set(s.migrated)
        rec = s.get_node("legacy")
        assert (rec.reputation, rec.jobs_today, rec.drained, rec.throughput, rec.daily_quota) == (0.4, 2, False, {}, None)
        s.record_job_throughput("legacy", "bm", 12.0)
        assert s.get_node("legacy").samples_per_s("bm") == 12.0
    with StateStore(state_url) as s:
        assert s.migrated == []  # idempotent
