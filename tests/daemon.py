"""A real `dagster-daemon run` for the tests that depend on it, and polling with diagnostics."""

import signal
import time
from pathlib import Path

import psutil

from mloc_dagster.execution.daemon import DaemonProcess


class Daemon(DaemonProcess):
    """`dagster-daemon run` on the test's DAGSTER_HOME (``mloc_dagster/execution/daemon.py``), with what tests
    add: a crash (``kill``) and the log's tail for a failure message."""

    def __init__(self, home: Path, **env):
        super().__init__(home / "daemon.log", env)

    def kill(self, sig=signal.SIGKILL):
        """Kill the daemon and its code server with no chance to clean up. Run workers it launched
        keep running, as they would after a real crash of the daemon."""
        parent = psutil.Process(self.proc.pid)
        for child in parent.children(recursive=False):
            if "api grpc" in " ".join(child.cmdline()) or "code-server" in " ".join(child.cmdline()):
                child.send_signal(sig)
        parent.send_signal(sig)
        self.proc.wait(timeout=60)

    def tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "skipped" not in line and "Checking for new runs" not in line)[-6000:]


def wait_for(predicate, timeout_s, what, daemon: Daemon, diagnose=lambda: ""):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; {diagnose()}\ndaemon log tail:\n{daemon.tail()}")


def ignore_stop_signals() -> None:
    """``preexec_fn``: SIGINT and SIGTERM ignored, as a shell starts `nohup ... &` (and CI its jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ignores(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores ``sig`` (/proc/<pid>/status SigIgn)."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigIgn"))
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
