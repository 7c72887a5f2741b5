"""`mloc node head` / `mloc node join`: a pool of real machines as a Ray cluster (docs/pool.md, "Add a
GPU box to the pool"; core/pool/ray_cluster.py has the rules).

head   on the server: refuses SQLite and a Ray cluster without token authentication, records the
       deployment (its id and code version: MLOC_HOME/pool/pool.json and the Dagster database), then
       runs `ray start --head`.
join   on a GPU box: refuses unless the box sees the same database, the same MLOC_HOME (the head's
       pool.json, and a probe file written and read back), the same code and token authentication;
       registers the node with its device, then runs `ray start` advertising the node's resource.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import typer

from mloc_dagster.cli.node import _fail, _store, console
from mloc_dagster.execution.node_worker import SOCKET_ENV

POOL_KEY = "mloc/pool"  # Dagster's key-value store: the head's pool.json record


def _ray() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.exists() else (shutil.which("ray") or "ray")


def _deployment():
    """The Dagster instance and state store of a multi-node deployment: Postgres, or refused."""
    from dagster import DagsterInstance

    from mloc_dagster.core.state.engine import resolve_state_url
    from mloc_dagster.paths import mloc_home

    state_url = resolve_state_url()
    if not state_url.startswith("postgresql"):
        _fail("the Ray deployment needs Postgres: set MLOC_DATABASE_URL to a postgresql:// URL "
              f"(the line's state is {state_url.split(':', 1)[0]}, one machine's file; deploy/ray/mloc.env.example)")
    instance = DagsterInstance.get()
    if "postgres" not in type(instance.run_storage).__name__.lower():
        _fail("the Ray deployment needs Postgres for Dagster too: DAGSTER_HOME's dagster.yaml must use "
              f"dagster_postgres storage (it uses {type(instance.run_storage).__name__}; deploy/ray/dagster.yaml)")
    return instance, mloc_home()


def record_pool(instance, home: Path, ray_address: str) -> dict:
    """The head's record of the deployment: MLOC_HOME/pool/pool.json and the same in Dagster's
    key-value store, which every joining node compares."""
    from mloc_dagster.core.pool.ray_cluster import write_pool_file

    record = write_pool_file(home, ray_address)
    instance.run_storage.set_cursor_values({POOL_KEY: json.dumps(record)})
    return record


def _exec(args: list[str], **env_vars: str) -> None:
    """Become ``args`` (Ray's process from here: stop it with `ray stop`), with this environment's
    ``dagster`` first on PATH (the run launcher's entry point) and ``env_vars``."""
    env = {**os.environ, **env_vars, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    console.print(f"[cyan]{' '.join(args[:3])}[/] ...", soft_wrap=True)
    sys.stdout.flush()
    os.execve(args[0], args, env)


def head(host: str = typer.Option(..., "--host", help="The address nodes reach the head on."),
         port: int = typer.Option(6379, "--port"), dashboard_port: int = typer.Option(8265, "--dashboard-port"),
         temp_dir: str = typer.Option(None, "--temp-dir", help="Ray's session directory (default /tmp/ray)."),
         block: bool = typer.Option(False, "--block", help="Stay in the foreground (ray start --block).")) -> None:
    """Start the pool's Ray head on the server (no work runs on it)."""
    instance, home = _deployment()
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        _fail("refusing to start a Ray cluster without token authentication: anyone who reaches its ports "
              "could run code on it. Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (a long random secret)")
    record = record_pool(instance, home, f"{host}:{port}")
    console.print(f"pool deployment {record['deployment_id'][:12]}, code {record['code_version']}; "
                  f"nodes join with: mloc node join --address {host}:{port}", soft_wrap=True)
    _exec([_ray(), "start", "--head", f"--node-ip-address={host}", f"--port={port}", "--num-cpus=0",
           "--num-gpus=0", "--include-dashboard=true", f"--dashboard-host={host}",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
           *([f"--temp-dir={temp_dir}"] if temp_dir else []), *(["--block"] if block else [])])


def join(address: str = typer.Option(..., "--address", help="HEAD:PORT of the pool's Ray head."),
         node_id: str = typer.Option(None, "--node-id", help="Default: MLOC_NODE_ID, else this host's name."),
         node_ip: str = typer.Option(None, "--node-ip", help="This box's address as the head sees it."),
         temp_dir: str = typer.Option(None, "--temp-dir", help="Ray's session directory (default /tmp/ray)."),
         gpu_state_dir: str = typer.Option("/var/lib/mloc/gpu", "--gpu-state-dir",
                                           help="This box's own disk: the GPU arbiter's leases of its devices."),
         block: bool = typer.Option(False, "--block", help="Stay in the foreground (ray start --block).")) -> None:
    """Join this GPU box to the pool: checked, registered with its device, then a Ray worker
    advertising the node's resource (runs pinned to the node land here)."""
    from mloc_dagster.core.pool.calibration import local_device, local_node_id
    from mloc_dagster.core.pool.ray_cluster import NODE_LABEL, join_problems, node_resource
    from mloc_dagster.core.state.nodes import InvalidNodeId, validate_node_id

    try:  # before anything uses it (the probe file's name, the Ray resource)
        node_id = validate_node_id(node_id or local_node_id())
    except InvalidNodeId as exc:
        _fail(str(exc))
    instance, home = _deployment()
    stored = instance.run_storage.get_cursor_values({POOL_KEY}).get(POOL_KEY)
    problems = join_problems(home, json.loads(stored) if stored else None, node_id)
    if problems:
        _fail(f"node {node_id} may not join the pool:\n- " + "\n- ".join(problems))
    device = local_device()
    _store().heartbeat_node(node_id, host=socket.gethostname(), device=device)
    console.print(f"node {node_id} ({device.describe()}) registered; joining the Ray cluster at {address}")
    warm = _start_warm_worker(Path(gpu_state_dir).parent / "warm-worker")
    _exec([_ray(), "start", f"--address={address}", *([f"--node-ip-address={node_ip}"] if node_ip else []),
           f"--resources={json.dumps({node_resource(node_id): 1})}", f"--labels={NODE_LABEL}={node_id}",
           "--disable-usage-stats", *([f"--temp-dir={temp_dir}"] if temp_dir else []), *(["--block"] if block else [])],
          MLOC_NODE_ID=node_id, MLOC_GPU_STATE_DIR=gpu_state_dir,  # what the runs placed here work under
          **{SOCKET_ENV: warm})


def _start_warm_worker(own_dir: Path) -> str:
    """The node's warm run worker (execution/node_worker.py), in the background on the box's own
    disk; one joined before is replaced (its libraries may be older). Returns its socket."""
    import psutil

    own_dir.mkdir(parents=True, exist_ok=True)
    pid_file, sock = own_dir / "pid", own_dir / "warm.sock"
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        old = psutil.Process(int(pid_file.read_text()))
        if "mloc_dagster.execution.node_worker" in " ".join(old.cmdline()):
            old.kill()
    with open(own_dir / "log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mloc_dagster.execution.node_worker", "serve", str(sock)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    console.print(f"warm run worker {proc.pid} at {sock} (log {own_dir / 'log'})")
    return str(sock)
