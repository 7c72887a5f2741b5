"""A real multi-node Ray cluster on one machine, for the pool's tests: a Linux bridge with a private
/24 on the host, the pool's head (`mloc node head`) on the bridge address, and each pool node in its
own network namespace (`ip netns`, a veth pair into the bridge, its own address) joined with
`mloc node join`. Everything it made (processes, namespaces, links, Ray temp dirs) is removed at
``close``, also after a failure; only processes it started (and those inside its own namespaces)
are signalled."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

MLOC = str(Path(sys.executable).with_name("mloc"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_available() -> bool:
    name = f"mlocprobe{secrets.token_hex(3)}"
    if os.geteuid() != 0 or shutil.which("ip") is None or _ip("netns", "add", name, check=False).returncode:
        return False
    _ip("netns", "del", name, check=False)
    return True


class RayPool:
    def __init__(self, env: dict[str, str], nodes: int = 3):
        tag = secrets.token_hex(2)
        self.bridge, self.prefix = f"mlocbr{tag}", f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:], 16)}"
        self.head_ip = f"{self.prefix}.1"
        self.port, self.dashboard_port = 6379, 8265  # the bridge address is ours alone
        self.dashboard = f"http://{self.head_ip}:{self.dashboard_port}"
        self.token = secrets.token_hex(16)
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "MLOC_RAY_DASHBOARD": self.dashboard, "MLOC_RAY_JOB_API": self.dashboard}
        self.tmp = Path(tempfile.mkdtemp(prefix="mloc-ray-", dir="/tmp"))  # Ray's socket paths stay short
        self.node_ids = [f"n{i}" for i in range(1, nodes + 1)]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.joins: dict[str, subprocess.Popen] = {}
        self.join_attempts: dict[str, int] = {}
        self.logs: list[Path] = []

    # ---- up

    def start(self) -> RayPool:
        # A Ray head binds its ports (6379, 10001, ...) on every address: one cluster per machine at a
        # time, whatever test session builds it.
        self.lock = FileLock("/tmp/mloc-ray-cluster.lock")
        self.lock.acquire(timeout=1800)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.head = self._spawn("head", [MLOC, "node", "head", "--host", self.head_ip, "--port", str(self.port),
                                         "--dashboard-port", str(self.dashboard_port),
                                         "--temp-dir", str(self.tmp / "head"), "--block"])
        for i, node_id in enumerate(self.node_ids, 1):
            self.add_namespace(node_id, i)
        return self

    def add_namespace(self, node_id: str, i: int) -> None:
        ns, veth = f"{self.bridge}-{node_id}", f"{self.bridge}v{i}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def node_ip(self, i: int) -> str:
        return f"{self.prefix}.{10 + i}"

    def keep_joined(self, node_id: str, attempts: int = 3) -> None:
        """Join the node again if its `mloc node join` exited: on an overloaded machine Ray's own
        start-up of a node can time out (its raylet must register within 30 s), and an operator
        would run the command again. At most ``attempts`` joins."""
        proc = self.joins.get(node_id)
        if proc is not None and proc.poll() is not None and self.join_attempts[node_id] < attempts:
            self._kill_namespace(f"{self.bridge}-{node_id}")  # what the failed start left
            self.join(node_id)

    def join(self, node_id: str) -> subprocess.Popen:
        i = self.node_ids.index(node_id) + 1
        self.join_attempts[node_id] = self.join_attempts.get(node_id, 0) + 1
        self.joins[node_id] = self._spawn(node_id, ["ip", "netns", "exec", f"{self.bridge}-{node_id}", MLOC, "node", "join",
                                     "--address", f"{self.head_ip}:{self.port}", "--node-id", node_id,
                                     "--node-ip", self.node_ip(i), "--temp-dir", str(self.tmp / node_id),
                                     "--gpu-state-dir", str(self.tmp / node_id / "gpu"), "--block"],
                                          self.env)
        return self.joins[node_id]

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    # ---- faults

    def kill_node(self, node_id: str) -> None:
        """SIGKILL every process in the node's namespace: its raylet, workers and `ray start`."""
        self._kill_namespace(f"{self.bridge}-{node_id}")

    def _kill_namespace(self, ns: str) -> None:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    # ---- down

    def close(self) -> None:
        for ns in self.namespaces:
            self._kill_namespace(ns)
        for proc in self.procs:  # the head's session holds gcs_server, raylet and the dashboard
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._kill_leftovers()
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)  # takes the host ends of the veth pairs with it
        shutil.rmtree(self.tmp, ignore_errors=True)
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _kill_leftovers(self) -> None:
        """Ray daemonizes some processes out of the session (the head's log monitor, dashboard
        agents): those whose command line names this cluster's temp dir are ours."""
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if str(self.tmp).encode() in (proc_dir / "cmdline").read_bytes():
                    os.kill(int(proc_dir.name), signal.SIGKILL)
