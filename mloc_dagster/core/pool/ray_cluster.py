"""A pool of real machines as a Ray cluster: what a node advertises, Ray's node table as the pool's
liveness, and the checks a machine passes before it joins.

A pool node joins with ``ray start`` advertising one custom resource for its pool node id
(``node_resource``) and the label ``mloc/node``; a run pinned to the node asks Ray for that resource
(``execution/ray.py``). Whether a node is up is Ray's answer, read from the head's state API
(``GET /api/v0/nodes``): alive, dead, or absent. There is no second heartbeat for it.

Joining needs what a multi-node deployment needs (``join_problems``): Postgres for Dagster's and
the line's state (SQLite files are one machine's), ``MLOC_HOME`` on storage every node mounts (the
node finds the deployment's ``pool.json`` that the head wrote, with the same deployment id the
head stored in the database, and can write and read a probe file there), the same code as the
head (compared by a hash of the package source), and Ray token authentication.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

NODE_RESOURCE_PREFIX = "mloc_node:"
NODE_LABEL = "mloc/node"
POOL_FILE = "pool.json"  # under MLOC_HOME/pool/: written by the head, read by every joining node
DASHBOARD_ENV = "MLOC_RAY_DASHBOARD"  # http://HEAD:8265: set, the pool's liveness is Ray's
PACKAGE = Path(__file__).resolve().parents[2]  # mloc_dagster/


def node_resource(node_id: str) -> str:
    return f"{NODE_RESOURCE_PREFIX}{node_id}"


@dataclass(frozen=True)
class RayNode:
    node_id: str  # the pool's
    ray_node_id: str
    ip: str
    alive: bool
    gpus: float
    state_message: str = ""


class RayUnreachable(RuntimeError):
    """The Ray head's state API did not answer."""


def ray_node_table(dashboard: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, RayNode]:
    """Ray's node table by pool node id (nodes without the ``mloc/node`` label, the head, are left
    out); a node id seen on several Ray nodes (a machine that re-joined) is alive if any is."""
    request = urllib.request.Request(f"{dashboard.rstrip('/')}/api/v0/nodes?detail=1&limit=10000")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            rows = json.load(response)["data"]["result"]["result"]
    except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
        raise RayUnreachable(f"Ray state API at {dashboard} did not answer: {exc}") from exc
    table: dict[str, RayNode] = {}
    for row in rows:
        node_id = (row.get("labels") or {}).get(NODE_LABEL)
        if not node_id:
            continue
        node = RayNode(node_id, row.get("node_id", ""), row.get("node_ip", ""), row.get("state") == "ALIVE",
                       float((row.get("resources_total") or {}).get("GPU", 0.0)), row.get("state_message") or "")
        if node_id not in table or (node.alive and not table[node_id].alive):
            table[node_id] = node
    return table


def ray_pool() -> bool:
    """Whether this deployment's pool is a Ray cluster (``MLOC_RAY_DASHBOARD`` set)."""
    return bool(os.environ.get(DASHBOARD_ENV))


def pool_ray_table() -> dict[str, RayNode] | None:
    """The node table of this deployment's Ray cluster (``MLOC_RAY_DASHBOARD``), or None when the
    pool is not on Ray (the registry's heartbeats decide then)."""
    return ray_node_table(os.environ[DASHBOARD_ENV], os.environ.get("RAY_AUTH_TOKEN")) if ray_pool() else None


def local_address() -> str | None:
    """The address this process reaches the Ray head from (its node's, inside a node's network), or
    None when the pool is not on Ray: what a run records about where it executed."""
    dashboard = os.environ.get(DASHBOARD_ENV)
    if not dashboard:
        return None
    host = urllib.parse.urlsplit(dashboard).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: a route lookup
        s.connect((host, 9))
        return s.getsockname()[0]


def ray_unavailable_reason(node_id: str, table: dict[str, RayNode]) -> str | None:
    node = table.get(node_id)
    if node is None:
        return "unavailable: not in the Ray cluster (mloc node join)"
    if not node.alive:
        return f"unavailable: dead in the Ray cluster ({node.state_message or 'no message'})"
    return None


# --------------------------------------------------------------------------- joining


def code_version() -> str:
    """A hash of the package's source: the same on every machine running the same code."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def write_pool_file(home: Path, ray_address: str) -> dict:
    """The head's side: a new deployment id and the code version in ``MLOC_HOME/pool/pool.json``."""
    record = {"deployment_id": uuid.uuid4().hex, "code_version": code_version(), "ray_address": ray_address}
    path = Path(home) / "pool" / POOL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


def join_problems(home: Path, expected: dict | None, node_id: str) -> list[str]:
    """Why this machine may not join the pool whose head stored ``expected`` (its pool.json record,
    from the database); empty when it may."""
    if expected is None:
        return ["no pool head is recorded in the database: start the head first (mloc node head)"]
    problems = []
    pool_file = Path(home) / "pool" / POOL_FILE
    try:
        seen = json.loads(pool_file.read_text())
    except (OSError, ValueError):
        seen = None
    if seen is None or seen.get("deployment_id") != expected["deployment_id"]:
        problems.append(f"MLOC_HOME {home} is not the pool's shared storage: {pool_file} "
                        + ("is missing" if seen is None else "belongs to another deployment")
                        + " (mount the head's MLOC_HOME here)")
    probe = Path(home) / "pool" / f".probe-{node_id}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text(node_id)
        readable = probe.read_text() == node_id
        probe.unlink()
    except OSError as exc:
        readable = False
        problems.append(f"MLOC_HOME {home} is not writable from this node: {exc}")
    if not readable and not problems:
        problems.append(f"MLOC_HOME {home}: a probe file written here did not read back")
    mine = code_version()
    if mine != expected["code_version"]:
        problems.append(f"this node runs mloc code {mine}, the pool's head runs {expected['code_version']}: "
                        "deploy the same code and environment on every node")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        problems.append("Ray token authentication is off: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the "
                        "pool's shared secret) as on the head")
    return problems
