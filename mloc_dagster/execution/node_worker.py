"""A warm run worker on each pool node of the Ray deployment: runs start in a second, not seven.

On the embedded default every run worker is forked from a process that has imported torch,
transformers, peft and dagster once (``execution/launcher.py``). On a Ray pool each run is a Ray
job whose entry point is ``dagster api execute_run ...``: a fresh Python that imports all of that
again on the node (5.7 s of the 10 s a chained job waited to start, ``bench/pool_ray.py``). So
``mloc node join`` starts one warm worker server on the box (``serve``: those libraries imported,
one thread, a unix socket under the node's own directory), and the launcher
(``execution/ray_launcher.py``) wraps each run's entry point in ``run``:

- ``run -- dagster api execute_run ARGS``: the Ray job's process. It hands its command line,
  environment, working directory and its stdin/stdout/stderr (``SCM_RIGHTS``) to the node's
  server and waits; the server forks a worker that takes all of them and runs exactly that
  ``dagster api`` command, in the job's environment; the worker's exit code becomes the job's.
  SIGTERM/SIGINT to the job (Ray's job stop: Dagster's terminate) reach the worker as SIGINT, which
  Dagster turns into a clean interrupt; a worker whose job process is gone interrupts itself.
  No server on the node (``MLOC_WARM_SOCKET`` unset or nobody listening), or a command that is not
  a ``dagster api`` run command: it becomes the command itself (a fresh process, as before).
- Our own code is imported fresh in every worker (a code change reaches the next run); only
  third-party libraries are shared, copy-on-write. Nothing is unpickled: the request is JSON.

This module's top level imports nothing heavy: ``run`` starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time

SOCKET_ENV = "MLOC_WARM_SOCKET"
FORKED_ENV = "MLOC_WARM_FORKED"  # set in a forked worker: "<server pid>"
_RUN_COMMANDS = ("execute_run", "resume_run")
_MAX_REQUEST = 16 << 20


def dagster_args(argv: list[str]) -> list[str] | None:
    """The arguments after the ``dagster`` entry point when ``argv`` is a ``dagster api`` run
    command (``dagster api execute_run ...`` or ``python -m dagster api ...``), else None."""
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) == "dagster":  # the dagster script, or `python -m dagster`
            rest = argv[i + 1:]
            return rest if len(rest) >= 2 and rest[0] == "api" and rest[1] in _RUN_COMMANDS else None
    return None


# ---------------------------------------------------------------------------------------- client


def run(argv: list[str]) -> int:
    """The Ray job's process: the run forked on the node's warm server, else ``argv`` itself."""
    path = os.environ.get(SOCKET_ENV)
    conn = None
    if path and dagster_args(argv) is not None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError as exc:
            print(f"mloc: no warm worker at {path} ({exc}); starting a fresh process", file=sys.stderr, flush=True)
            conn.close()
            conn = None
    if conn is None:
        os.execvp(argv[0], argv)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    message = struct.pack("!I", len(request)) + request
    sent = socket.send_fds(conn, [message], [0, 1, 2])  # the streams go with the first bytes
    conn.sendall(message[sent:])
    reply = _lines(conn)
    started = next(reply, None)
    if started is None or "pid" not in started:
        print(f"mloc: the warm worker refused the run: {started}", file=sys.stderr, flush=True)
        return 1
    pid = started["pid"]
    print(f"mloc: run worker {pid} forked by the node's warm worker {started['server']}", file=sys.stderr, flush=True)
    forward = lambda *_: _signal(pid, signal.SIGINT)  # noqa: E731 - Dagster's clean interrupt
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ended = next(reply, None)
    return int(ended["exit"]) if ended and "exit" in ended else 1  # no word: the worker died


def _lines(conn: socket.socket):
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------- server


def serve(path: str) -> None:
    """The node's warm server: import the heavy libraries once, then fork a worker per request."""
    from mloc_dagster.execution.launcher import PRELOAD

    for module in PRELOAD:
        __import__(module)
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)  # the node's own account only
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    print(f"mloc warm worker {os.getpid()} ready at {path}", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(10.0)  # a caller that sends nothing does not hold the server
            request, fds = _receive(conn)
            conn.settimeout(None)
        except (OSError, ValueError) as exc:
            print(f"refused a request: {exc}", flush=True)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _worker(conn, request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    try:
        return _request(conn, data, len(fds)), fds
    except (OSError, ValueError):
        for fd in fds:  # a refused request keeps nothing open here
            os.close(fd)
        raise


def _request(conn: socket.socket, data: bytes, n_fds: int) -> dict:
    while 0 < len(data) < 4 and (chunk := conn.recv(4 - len(data))):
        data += chunk
    if n_fds != 3 or len(data) < 4:
        raise ValueError("a request is a length-prefixed JSON object with the caller's stdin, stdout, stderr")
    size = struct.unpack("!I", data[:4])[0]
    if size > _MAX_REQUEST:
        raise ValueError(f"request of {size} bytes")
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(min(65536, size - len(data)))
        if not chunk:
            raise ValueError("the request was cut short")
        data += chunk
    request = json.loads(data)
    if not isinstance(request, dict) or dagster_args(request.get("argv") or []) is None:
        raise ValueError("only a `dagster api execute_run|resume_run` command is run here")
    return request


def _worker(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """The forked worker: the caller's environment, directory and standard streams, then the run."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"], **{FORKED_ENV: str(os.getppid())})
        os.chdir(request["cwd"])
        caller = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        conn.sendall(json.dumps({"pid": os.getpid(), "server": os.getppid()}).encode() + b"\n")
        threading.Thread(target=_watch, args=(caller,), daemon=True).start()
        code = _dagster(dagster_args(request["argv"]))
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        finally:
            os._exit(code)


def _dagster(args: list[str]) -> int:
    from dagster._cli import main

    sys.argv = ["dagster", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _watch(caller: int) -> None:
    """Interrupt this worker when the Ray job's process is gone (killed without forwarding)."""
    while True:
        time.sleep(2.0)
        try:
            os.kill(caller, 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60.0)
            os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1])
    elif len(argv) >= 2 and argv[0] == "run" and argv[1] == "--":
        sys.exit(run(argv[2:]))
    else:
        sys.exit("usage: python -m mloc_dagster.execution.node_worker serve SOCKET | run -- COMMAND...")


if __name__ == "__main__":
    main(sys.argv[1:])
