"""The node registry in the Prometheus scrape (``LineCollector``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from mloc_dagster.core.state import StateStore
from mloc_dagster.operations.metrics import LineCollector


def test_scrape_shows_each_nodes_figures(tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.heartbeat_node("gpu-1")
    store.record_job_throughput("gpu-1", "0123456789abcdef", 42.5, source="calibrate")
    store.set_node_quota("gpu-1", 4)
    assert store.take_job_quota("gpu-1")
    store.set_node_drained("gpu-2", True)
    store.set_node_reputation("gpu-2", 0.25)
    reg = CollectorRegistry()
    reg.register(LineCollector(store))
    text = generate_latest(reg).decode()
    assert 'mloc_node_samples_per_second{base_model="0123456789ab",node="gpu-1"} 42.5' in text
    assert 'mloc_node_jobs_today{node="gpu-1"} 1.0' in text and 'mloc_node_daily_quota{node="gpu-1"} 4.0' in text
    assert 'mloc_node_daily_quota{node="gpu-2"} 10.0' in text
    assert 'mloc_node_reputation{node="gpu-2"} 0.25' in text
    assert 'mloc_node_available{node="gpu-1",reason=""} 1.0' in text
    assert 'mloc_node_available{node="gpu-2",reason="drained"} 0.0' in text
    assert 'mloc_node_last_seen_timestamp_seconds{node="gpu-1"}' in text
    assert 'mloc_node_last_seen_timestamp_seconds{node="gpu-2"}' not in text  # never seen
    store.close()
