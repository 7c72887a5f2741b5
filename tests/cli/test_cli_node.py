"""`mloc node ...` as an operator runs it: subprocesses against a real state store (and, for
calibrate, a real base model and dataset version registered through Dagster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MLOC = str(Path(sys.executable).parent / "mloc")


def mloc(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([MLOC, "node", *args], env={**os.environ, "COLUMNS": "200", **env}, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_registry_commands(mloc_home) -> None:
    beat = json.loads(mloc("heartbeat", "--json", MLOC_NODE_ID="worker-1").stdout)
    assert beat["node_id"] == "worker-1" and beat["device"]["kind"] in ("cpu", "cuda") and beat["last_seen_at"]
    mloc("heartbeat", "worker-2")
    assert json.loads(mloc("set-quota", "worker-1", "3", "--json").stdout)["daily_quota"] == 3
    assert "drained" in mloc("drain", "worker-2", "--reason", "disk failing").stdout
    nodes = {n["node_id"]: n for n in json.loads(mloc("list", "--json").stdout)}
    assert nodes["worker-1"]["quota"] == 3 and nodes["worker-1"]["unavailable"] is None
    assert nodes["worker-2"]["unavailable"] == "drained" and nodes["worker-2"]["drained_reason"] == "disk failing"
    table = mloc("list").stdout
    assert "worker-1" in table and "available" in table and "0/3" in table
    shown = json.loads(mloc("show", "worker-2", "--json").stdout)
    assert shown["drained"] is True and shown["quota"] == 10
    assert not json.loads(mloc("undrain", "worker-2", "--json").stdout)["drained"]
    assert json.loads(mloc("set-quota", "worker-1", "--default", "--json").stdout)["daily_quota"] is None
    # a node that has not been seen for longer than the TTL is unavailable
    stale = {n["node_id"]: n for n in json.loads(mloc("list", "--json", MLOC_NODE_TTL_S="0").stdout)}
    assert stale["worker-1"]["unavailable"].startswith("unavailable: last seen")


def test_bad_input_is_refused_clearly(mloc_home) -> None:
    proc = mloc("set-quota", "Worker_1.lab", "3", check=False)
    assert proc.returncode == 1 and "[a-z0-9-]" in proc.stdout and "'worker-1-lab'" in proc.stdout
    assert mloc("heartbeat", "UPPER", check=False).returncode == 1
    assert mloc("show", "nobody", check=False).returncode == 1
    assert mloc("set-quota", "worker-1", check=False).returncode == 1  # neither a quota nor --default
    proc = mloc("place", "--samples", "100", "--base-model", "bm-1", check=False)
    assert proc.returncode == 1 and "no node available" in proc.stdout


def test_calibrate_then_place(registered_base) -> None:
    """A real short training run measures this machine; placement then uses the figure."""
    out = json.loads(mloc("calibrate", "--steps", "6", "--dialect", "en-gb-scotland", "--json",
                          MLOC_NODE_ID="cal-node").stdout)
    assert out["node_id"] == "cal-node" and out["steps"] == 6 and out["samples_per_s"] > 0
    base = out["base_model"]
    assert out["node"]["throughput"][base]["source"] == "calibrate"
    assert out["node"]["last_seen_at"] is not None
    mloc("heartbeat", "other")  # seen, but never calibrated: skipped with the reason
    placed = json.loads(mloc("place", "--samples", "500", "--json").stdout)  # base: the latest base_model
    assert placed["base_model"] == base
    assert [(s["node_id"], s["samples"]) for s in placed["shards"]] == [("cal-node", 500)]
    assert "no throughput" in placed["skipped"]["other"]
