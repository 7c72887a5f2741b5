"""`dagster dev` for `make ui` and `mloc demo --ui`, stopped cleanly on Ctrl-C or SIGTERM.

`dagster dev` runs the webserver, the daemon and a code server as its children, and may take a
long time to act on SIGTERM. Here it runs in its own session; on SIGINT or SIGTERM (or when the
parent, e.g. `make`, goes away) its whole process group gets SIGTERM, and whatever is still alive
after ``stop_timeout_s`` (children that left the group included) gets SIGKILL, so nothing is left
behind and the stop takes at most ``stop_timeout_s`` plus a moment.

    python -m mloc_dagster.cli.ui [--host 127.0.0.1] [--port 3000]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mloc_dagster.cli.stop_signals import StopSignals
from mloc_dagster.execution.daemon import default_signals
from mloc_dagster.paths import REPO

STOP_TIMEOUT_S = 8.0


def stop_process_tree(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``proc``'s process group, then SIGKILL every survivor (group and descendants)."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in family):
        time.sleep(0.1)
        proc.poll()  # reap, so the leader does not linger as a zombie
    _signal_group(proc.pid, signal.SIGKILL)
    for pid in family:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def serve(host: str = "127.0.0.1", port: int = 3000, workspace: Path = REPO / "workspace.yaml",
          stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run `dagster dev` until it exits or this process gets SIGINT/SIGTERM; 0 after a requested stop."""
    dagster = Path(sys.executable).parent / "dagster"
    # From DAGSTER_HOME: dagster dev warns about any other dagster.yaml in its working directory (the
    # checkout has one, the template DAGSTER_HOME links to).
    home = os.environ.get("DAGSTER_HOME")
    cwd = home if home and Path(home).is_dir() else None
    proc = subprocess.Popen([str(dagster), "dev", "-w", str(Path(workspace).absolute()), "-h", host, "-p", str(port)],
                            start_new_session=True, cwd=cwd, preexec_fn=default_signals)
    stopped = False
    parent = os.getppid()
    with StopSignals() as stop:
        try:
            # A parent that goes away (re-parented: a `make ui` killed hard) is a stop request too.
            while proc.poll() is None and not stop.wait(0.5) and os.getppid() == parent:
                pass
        finally:
            if proc.poll() is None:  # asked to stop (or interrupted): take the whole tree down
                print("stopping dagster dev ...", file=sys.stderr, flush=True)
                stop_process_tree(proc, stop_timeout_s)
                stopped = True
    return 0 if stopped else proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address of the UI (0.0.0.0: every interface, "
                        "unauthenticated: see docs/operations.md).")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace.yaml")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints where a stop hangs
    return serve(args.host, args.port, args.workspace)


if __name__ == "__main__":
    sys.exit(main())
