"""The pool on a real Ray cluster (issue 19, first part): `mloc node head` and `mloc node join`, and
the pool's liveness read from Ray's node table.

The checks a joining machine passes are tested in process (each refusal happens before Ray starts);
the cluster test builds a real one on this machine (tests/deploy/ray_cluster.py: the head on a
bridge, three nodes each in its own network namespace), on a real Postgres reached through its unix
socket from inside the namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from typer.testing import CliRunner

from mloc_dagster.cli.main import app
from mloc_dagster.cli.ray_node import POOL_KEY, record_pool
from mloc_dagster.core.training.checkpoint import latest_partial
from tests.conftest_pg import fresh_database
from tests.deploy.ray_cluster import RayPool, netns_available

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
DIALECT = "en-gb-scotland"
RAY_YAML = REPO / "deploy" / "ray" / "dagster.yaml"


def _pg_url(pg_server, db: str) -> str:  # the unix socket: reachable from inside a network namespace
    return f"postgresql+psycopg2://{pg_server.user}@/{db}?host={pg_server.datadir.parent}&port={pg_server.port}"


@pytest.fixture
def pool_env(pg_server, tmp_path) -> dict[str, str]:
    """The environment of a Ray deployment (deploy/ray): Dagster and the line's state on Postgres,
    a shared MLOC_HOME, the instance file as shipped."""
    with fresh_database(pg_server) as dagster_db, fresh_database(pg_server) as state_db:
        home = tmp_path / "home"
        (home / "dagster").mkdir(parents=True)
        shutil.copy(RAY_YAML, home / "dagster" / "dagster.yaml")
        yield {"MLOC_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
               "DAGSTER_PG_URL": _pg_url(pg_server, dagster_db), "MLOC_DATABASE_URL": _pg_url(pg_server, state_db),
               "MLOC_RAY_JOB_API": "http://127.0.0.1:8265", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret-token"}


def mloc(env: dict[str, str], *args: str):
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def test_the_ray_instance_file_runs_every_run_as_a_ray_job(pool_env, monkeypatch):
    for k, v in pool_env.items():
        monkeypatch.setenv(k, v)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_launcher).__name__ == "PoolRayRunLauncher"  # dagster-ray's, + re-placement
        assert instance.run_launcher.address == "http://127.0.0.1:8265"
        assert "PostgresRunStorage" in type(instance.run_storage).__name__


def test_the_ray_deployment_refuses_sqlite(pool_env, tmp_path):
    sqlite_state = {k: v for k, v in pool_env.items() if k != "MLOC_DATABASE_URL"}
    out = mloc(sqlite_state, "node", "head", "--host", "10.9.9.1")
    assert out.exit_code == 1 and "the Ray deployment needs Postgres: set MLOC_DATABASE_URL" in out.output
    (tmp_path / "sqlite-dagster").mkdir()
    sqlite_dagster = {**pool_env, "DAGSTER_HOME": str(tmp_path / "sqlite-dagster")}
    out = mloc(sqlite_dagster, "node", "join", "--address", "10.9.9.1:6379")
    assert out.exit_code == 1 and "needs Postgres for Dagster too" in out.output


def test_a_head_without_token_authentication_is_refused(pool_env):
    out = mloc({**pool_env, "RAY_AUTH_MODE": ""}, "node", "head", "--host", "10.9.9.1")
    assert out.exit_code == 1 and "without token authentication" in out.output
    assert "s3cret-token" not in out.output


def test_a_node_is_refused_without_the_shared_home_the_same_code_or_token_auth(pool_env, tmp_path, monkeypatch):
    out = mloc(pool_env, "node", "join", "--address", "10.9.9.1:6379", "--node-id", "../escape")
    assert out.exit_code == 1 and "must be lowercase [a-z0-9-]" in out.output  # never a path or a Ray resource
    out = mloc(pool_env, "node", "join", "--address", "10.9.9.1:6379", "--node-id", "box1")
    assert out.exit_code == 1 and "no pool head is recorded in the database" in out.output

    for k, v in pool_env.items():
        monkeypatch.setenv(k, v)
    with dg.DagsterInstance.get() as instance:
        record = record_pool(instance, Path(pool_env["MLOC_HOME"]), "10.9.9.1:6379")
        (tmp_path / "local-disk").mkdir()
        out = mloc({**pool_env, "MLOC_HOME": str(tmp_path / "local-disk")}, "node", "join", "--address",
                   "10.9.9.1:6379", "--node-id", "box1")
        assert out.exit_code == 1 and "is not the pool's shared storage" in out.output and "is missing" in out.output

        instance.run_storage.set_cursor_values({POOL_KEY: json.dumps({**record, "code_version": "0123456789abcdef"})})
        out = mloc(pool_env, "node", "join", "--address", "10.9.9.1:6379", "--node-id", "box1")
        assert out.exit_code == 1 and f"this node runs mloc code {record['code_version']}" in out.output
        assert "the pool's head runs 0123456789abcdef" in out.output

        instance.run_storage.set_cursor_values({POOL_KEY: json.dumps(record)})
        out = mloc({**pool_env, "RAY_AUTH_MODE": "disabled"}, "node", "join", "--address", "10.9.9.1:6379",
                   "--node-id", "box1")
        assert out.exit_code == 1 and "Ray token authentication is off" in out.output
    listed = mloc(pool_env, "node", "list", "--json")
    assert json.loads(listed.output) == []  # a refused machine is not registered


def _nodes(env: dict[str, str]) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "mloc_dagster.cli.main", "node", "list", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return {n["node_id"]: n for n in json.loads(out.stdout)}


def _wait_for(what: str, check, timeout_s: float, cluster: RayPool, daemon=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s\nhead: {cluster.log('head')}\n"
                         + "\n".join(f"{n}: {cluster.log(n)}" for n in cluster.node_ids)
                         + (f"\ndaemon: {daemon.tail()}" if daemon is not None else ""))


@pytest.mark.slow
def test_a_distributed_run_executes_on_real_ray_nodes_and_a_dead_node_is_seen_within_60_s(
        pool_env, espeak_batch, monkeypatch, tmp_path):
    """The head and two nodes (each in its own network namespace) join through `mloc`; the daemon
    launches every run as a Ray job (deploy/ray/dagster.yaml); a distributed run of 2 rounds places
    its slices on the nodes and each slice executes on its node (the address it saw is the node's);
    a third node joins while round 0 trains and gets work from the next round on; the rounds merge
    and a candidate is gated. A single run's 2 jobs are placed on nodes too; the node of its first job
    is killed after the job's first checkpoint: `mloc node list` shows it unavailable within 60 s,
    and Dagster's run retry, placed on another node, resumes the job from that checkpoint."""
    if not netns_available():
        pytest.skip("network namespaces cannot be made here (need root and iproute2)")
    from mloc_dagster.core.pool.rounds import base_model_hash
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.runs.service import StartRequest, start_run
    from tests.daemon import Daemon
    from tests.world import populate_home, tiny_base

    home = Path(pool_env["MLOC_HOME"])
    cluster = RayPool({**os.environ, **pool_env, "MLOC_RAY_GPUS_PER_RUN": "0"}, nodes=3)
    env = cluster.env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    daemon = None
    try:
        with dg.DagsterInstance.get() as instance:
            populate_home(instance, home, {"en-us": espeak_batch, DIALECT: espeak_batch}, tiny_base(tmp_path / "tiny"))
        cluster.start()
        _wait_for("the head's state API", lambda: _head_up(cluster), 90, cluster)
        first, late = cluster.node_ids[:2], cluster.node_ids[2]
        for node_id in first:
            cluster.join(node_id)
        nodes = _wait_for("two alive nodes", lambda: _all_alive(env, first, cluster), 180, cluster)
        for i, node_id in enumerate(first, 1):
            assert nodes[node_id]["ray"]["ip"] == cluster.node_ip(i)  # each in its own namespace
            assert nodes[node_id]["unavailable"] is None and nodes[node_id]["device"]["kind"] == "cpu"

        instance = dg.DagsterInstance.get()
        store = StateStore(pool_env["MLOC_DATABASE_URL"])
        run = start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=2, timebox_s=300,
                        hparams={"batch_size": 4, "max_steps": 2}, kind="distributed", parallelism=3,
                        round_samples=24))
        for node_id in cluster.node_ids:  # calibrated; the late node is not in the Ray cluster yet
            store.record_job_throughput(node_id, base_model_hash(run.base_model_version), 10.0, source="calibrate")
        daemon = Daemon(home, **env)
        daemon.start()
        _wait_for("round 0 placed", lambda: store.round_slices(run.run_id, 0), 120, cluster, daemon)
        # The late node joins while the run is live. Round 0's slices (a few steps each, started in a
        # second by the nodes' warm workers) may end before a join finishes on a loaded machine, so
        # the daemon rests meanwhile (round 0's Ray jobs run on): round 1 is placed only after.
        daemon.stop()
        cluster.join(late)
        _wait_for("the late node alive", lambda: _all_alive(env, [late], cluster), 180, cluster)
        late_alive_at = datetime.now(UTC)
        daemon = Daemon(home, **env)
        daemon.start()

        _wait_for("the distributed run to complete", lambda: _completed(store, run.run_id, instance), 900, cluster,
                  daemon)

        slices = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job",
                                                        tags={"mloc/run_id": run.run_id}))
        assert {r.dagster_run.tags["mloc/round"] for r in slices} == {"0", "1"}
        for record in slices:
            _assert_ran_on_its_node(instance, record, cluster)
        placed = {k: store.round_slices(run.run_id, k) for k in range(2)}
        assert {sl.node_id for sl in placed[0]} == set(first)  # the late node was not in the cluster yet
        later = [k for k, sls in placed.items() if min(sl.queued_at for sl in sls) > late_alive_at]
        assert later and all(late in {sl.node_id for sl in placed[k]} for k in later)  # work from the next round on
        for k in range(2):
            assert store.get_job(run.run_id, k).status == "succeeded"
        [candidate] = [c for c in store.list_candidates(DIALECT, limit=None) if c.training_run_id == run.run_id]
        assert candidate.gate_decision in ("passed", "failed")  # a verdict

        # A single run: each job placed on a node; job 0's node is killed after its first checkpoint.
        single = start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=2, timebox_s=300,
                           hparams={"batch_size": 4, "max_steps": 300, "checkpoint_every_s": 2}))
        job0_dir = home / "adapters" / DIALECT / single.run_id / "job-0000"
        _wait_for("job 0's first checkpoint", lambda: latest_partial(job0_dir), 300, cluster, daemon)
        [first_try] = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job",
                                                             tags={"mloc/run_id": single.run_id}))
        doomed = first_try.dagster_run.tags["mloc/node"]
        killed_at = time.monotonic()
        cluster.kill_node(doomed)
        nodes = _wait_for(f"{doomed} dead", lambda: _dead(env, doomed), 90, cluster, daemon)
        assert time.monotonic() - killed_at < 60  # `mloc node list` shows it within 60 s
        assert all(nodes[n]["unavailable"] is None for n in cluster.node_ids if n != doomed)
        _wait_for("the single run to complete", lambda: _completed(store, single.run_id, instance), 600, cluster,
                  daemon)
        jobs = instance.get_run_records(dg.RunsFilter(job_name="train_adapter_job", tags={"mloc/run_id": single.run_id,
                                                                                          "mloc/job_index": "0"}))
        retry = next(r for r in jobs if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS)
        assert retry.dagster_run.tags["mloc/moved_from"] == doomed and retry.dagster_run.tags["mloc/node"] != doomed
        _assert_ran_on_its_node(instance, retry, cluster)  # Dagster's retry, placed again, ran elsewhere
        assert _metadata(instance, retry)["resumed_kind"].value == "partial"  # from job 0's last checkpoint
        status = json.loads(mloc(env, "run", "status", single.run_id, "--json").output)
        assert [j["status"] for j in status["jobs"]] == ["succeeded", "succeeded"]
        assert all(j["node_id"] in cluster.node_ids and j["node_id"] != doomed for j in status["jobs"])
    finally:
        if daemon is not None:
            daemon.stop()
        cluster.close()
    assert subprocess.run(["ip", "link", "show", cluster.bridge], capture_output=True).returncode != 0


def _head_up(cluster: RayPool) -> bool:
    from mloc_dagster.core.pool.ray_cluster import RayUnreachable, ray_node_table

    try:
        ray_node_table(cluster.dashboard, cluster.token, timeout_s=2)
        return True
    except RayUnreachable:
        return False


def _all_alive(env, node_ids, cluster: RayPool | None = None) -> dict | None:
    for node_id in node_ids if cluster is not None else ():
        cluster.keep_joined(node_id)
    nodes = _nodes(env)
    ok = all(nodes.get(n, {}).get("ray") and nodes[n]["ray"]["alive"] for n in node_ids)
    return nodes if ok else None


def _dead(env, node_id: str) -> dict | None:
    nodes = _nodes(env)
    return nodes if "dead in the Ray cluster" in str(nodes[node_id]["unavailable"]) else None


def _failures(instance) -> list[str]:
    """What the failed Dagster runs said (their failure and engine events)."""
    out = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]), limit=5):
        for event in instance.all_logs(record.dagster_run.run_id):
            if event.is_dagster_event and (event.dagster_event.is_failure or event.dagster_event.is_engine_event):
                error = getattr(event.dagster_event.event_specific_data, "error", None)
                out.append(f"{record.dagster_run.job_name}: {event.message[:300]}"
                           + (f" {error.to_string()[-1500:]}" if error is not None else ""))
    return out[-12:]


def _completed(store, run_id: str, instance) -> bool:
    r = store.get_run(run_id)
    assert r.status not in ("failed", "paused", "cancelled"), (r.status, r.status_reason, _failures(instance))
    return r.status == "completed"


def _metadata(instance, record) -> dict:
    [event] = instance.get_records_for_run(record.dagster_run.run_id,
                                           of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return event.event_log_entry.asset_materialization.metadata


def _assert_ran_on_its_node(instance, record, cluster: RayPool) -> None:
    """The run's materialization says where it executed: the node it was placed on (the Ray worker
    `mloc node join` started there) and that node's address."""
    node_id = record.dagster_run.tags["mloc/node"]
    metadata = _metadata(instance, record)
    assert metadata["ran_on"].value == node_id
    assert metadata["ran_at"].value == cluster.node_ip(cluster.node_ids.index(node_id) + 1)
    assert metadata["warm_worker"].value  # forked by the node's warm run worker (execution/node_worker.py)


def test_a_placed_run_carries_the_ray_placement_dagster_ray_reads(monkeypatch):
    from dagster_ray.core.run_launcher import RayLauncherConfig

    from mloc_dagster.core.state.rounds import RoundSlice
    from mloc_dagster.core.state.runs import TrainingRun
    from mloc_dagster.execution.ray import RAY_CONFIG_TAG
    from mloc_dagster.runs.requests import slice_run_request, train_run_request

    run = TrainingRun(run_id="tr-1", dialect=DIALECT, dataset_version="/d", base_model_version="/m", hparams={},
                      timebox_s=60, max_jobs=2, candidate_every=2, status="active", status_reason=None,
                      last_finished_job=None, created_at=None, updated_at=None)
    placed = train_run_request(run, 0, "gpu-box-1").tags
    config = RayLauncherConfig.from_tags(placed)  # what the launcher will ask Ray for
    assert config.resources == {"mloc_node:gpu-box-1": 1} and config.num_gpus == 1
    assert placed["mloc/node"] == "gpu-box-1"  # and Dagster's per-node concurrency counts it
    assert RAY_CONFIG_TAG not in train_run_request(run, 0).tags  # off Ray: no placement
    monkeypatch.setenv("MLOC_RAY_GPUS_PER_RUN", "0")
    slice_ = RoundSlice(run_id="tr-1", round_index=0, slice_index=1, node_id="n2", segments=[[0, 8]], samples=8,
                        expected_s=1.0, status="queued", attempts=0, replaces=None, dagster_run_id=None,
                        checkpoint_path=None, adapter_sha256=None, metrics=None, progress=None, error=None,
                        outcome=None, queued_at=None, started_at=None, train_started_at=None, train_ended_at=None,
                        heartbeat_at=None, finished_at=None)
    config = RayLauncherConfig.from_tags(slice_run_request(run, slice_).tags)
    assert config.resources == {"mloc_node:n2": 1} and config.num_gpus is None  # a CPU-only pool


def test_on_a_ray_pool_liveness_is_rays_not_the_heartbeat_ttl():
    from datetime import timedelta

    from mloc_dagster.core.pool.placement import unavailable_reason
    from mloc_dagster.core.pool.ray_cluster import RayNode
    from mloc_dagster.core.state.nodes import NodeRecord

    now = datetime.now(UTC)
    stale = NodeRecord("n1", 1.0, now, last_seen_at=now - timedelta(hours=5))  # no heartbeat for hours
    table = {"n1": RayNode("n1", "ray-1", "10.0.0.11", alive=True, gpus=1.0)}
    assert unavailable_reason(stale, now=now, ray=table) is None
    assert unavailable_reason(stale, now=now).startswith("unavailable: last seen")  # off Ray: the TTL
    dead = {"n1": RayNode("n1", "ray-1", "10.0.0.11", alive=False, gpus=1.0, state_message="raylet died")}
    assert unavailable_reason(stale, now=now, ray=dead) == "unavailable: dead in the Ray cluster (raylet died)"
    assert unavailable_reason(stale, now=now, ray={}) == "unavailable: not in the Ray cluster (mloc node join)"
