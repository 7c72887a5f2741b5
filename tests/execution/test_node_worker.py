"""The warm run worker of a pool node (execution/node_worker.py) on real Dagster runs: the process a
Ray job starts hands `dagster api execute_run` to the node's server, which forks a worker with the
job's environment and standard streams; without a server the command runs as a fresh process; the
server runs nothing but Dagster run commands; a stopped job interrupts its worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._grpc.types import ExecuteRunArgs

from mloc_dagster.execution.node_worker import FORKED_ENV, SOCKET_ENV, dagster_args

REPO = Path(__file__).resolve().parents[2]


@dg.op(config_schema={"probe": str, "sleep_s": float})
def report_where(context) -> None:
    Path(context.op_config["probe"]).write_text(json.dumps(
        {"forked_by": os.environ.get(FORKED_ENV), "pid": os.getpid(), "marker": os.environ.get("JOB_MARKER")}))
    time.sleep(context.op_config["sleep_s"])


@dg.job
def where_job():
    report_where()


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory):
    sock = tmp_path_factory.mktemp("node") / "warm.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mloc_dagster.execution.node_worker", "serve", str(sock)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert "ready" in proc.stdout.readline()  # after the heavy imports
        yield proc, sock
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _run_command(tmp_path: Path, sleep_s: float = 0.0) -> tuple[dg.DagsterInstance, str, list[str], Path]:
    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))
    recon = dg.reconstructable(where_job)
    probe = tmp_path / "probe.json"
    run = instance.create_run_for_job(where_job, run_config={"ops": {"report_where": {"config": {
        "probe": str(probe), "sleep_s": sleep_s}}}}, job_code_origin=recon.get_python_origin())
    argv = list(ExecuteRunArgs(job_origin=recon.get_python_origin(), run_id=run.run_id,
                               instance_ref=instance.get_ref(), set_exit_code_on_failure=True).get_command_args())
    return instance, run.run_id, argv, probe


def _client(argv: list[str], socket_path: Path | None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    # as on a node: the environment's bin first on PATH (`mloc node join` sets it)
    env.update(PYTHONPATH=str(REPO), JOB_MARKER="the Ray job's environment",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if socket_path is not None:
        env[SOCKET_ENV] = str(socket_path)
    return subprocess.Popen([sys.executable, "-m", "mloc_dagster.execution.node_worker", "run", "--", *argv],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_run_is_forked_from_the_nodes_warm_worker(warm_server, tmp_path):
    server, sock = warm_server
    instance, run_id, argv, probe = _run_command(tmp_path)
    client = _client(argv, sock)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err[-3000:]
    assert f"forked by the node's warm worker {server.pid}" in err
    seen = json.loads(probe.read_text())
    assert seen["forked_by"] == str(server.pid) and seen["marker"] == "the Ray job's environment"
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    assert "RUN_SUCCESS" in out + err  # the worker wrote to the job's own standard streams


def test_without_a_warm_worker_the_command_runs_as_a_fresh_process(tmp_path):
    instance, run_id, argv, probe = _run_command(tmp_path)
    client = _client(argv, tmp_path / "nobody-listens.sock")
    _, err = client.communicate(timeout=120)
    assert client.returncode == 0, err[-3000:]
    assert "no warm worker at" in err and "starting a fresh process" in err
    assert json.loads(probe.read_text())["forked_by"] is None
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS


def test_the_warm_worker_runs_nothing_but_dagster_run_commands(warm_server, tmp_path):
    server, sock = warm_server
    assert dagster_args(["dagster", "api", "execute_run", "{}"]) == ["api", "execute_run", "{}"]
    assert dagster_args(["/venv/bin/python", "-m", "dagster", "api", "resume_run", "{}"]) == ["api", "resume_run", "{}"]
    assert dagster_args(["dagster", "dev"]) is None and dagster_args(["sh", "-c", "dagster api execute_run"]) is None
    touched = tmp_path / "touched"
    request = json.dumps({"argv": ["sh", "-c", f"touch {touched}"], "env": {}, "cwd": str(tmp_path)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock))
        socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        assert conn.recv(4096) == b""  # refused: the connection closes without a worker
    assert not touched.exists()
    for garbage in (b"\x00\x00", b"not a request"):  # no streams passed: refused, the server lives on
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(sock))
            conn.sendall(garbage)
            assert conn.recv(4096) == b""
    assert server.poll() is None
    plain = _client(["sh", "-c", f"touch {touched}"], sock)  # not a run command: never sent to the server
    plain.communicate(timeout=30)
    assert plain.returncode == 0 and touched.exists()


def test_stopping_the_job_interrupts_its_worker(warm_server, tmp_path):
    _, sock = warm_server
    instance, run_id, argv, probe = _run_command(tmp_path, sleep_s=120.0)
    client = _client(argv, sock)
    deadline = time.monotonic() + 120
    while not probe.exists():
        assert time.monotonic() < deadline and client.poll() is None, client.communicate()[1][-3000:]
        time.sleep(0.2)
    worker = psutil.Process(json.loads(probe.read_text())["pid"])
    client.send_signal(signal.SIGTERM)  # what Ray's job stop sends first
    client.communicate(timeout=60)
    psutil.wait_procs([worker], timeout=60)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert instance.get_run_by_id(run_id).is_finished and client.returncode != 0
