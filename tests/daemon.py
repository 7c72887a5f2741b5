"""A real `dagster-daemon run` for the tests that depend on it, and polling with diagnostics."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


class Daemon:
    """`dagster-daemon run` on the test's DAGSTER_HOME, as a user starts it."""

    def __init__(self, home: Path, **env):
        self.log_path = home / "daemon.log"
        self.env = os.environ.copy() | env
        self.proc = None

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                      str(REPO / "workspace.yaml")], cwd=REPO, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, sig=signal.SIGKILL):
        """Kill the daemon and its code server with no chance to clean up. Run workers it launched
        keep running, as they would after a real crash of the daemon."""
        parent = psutil.Process(self.proc.pid)
        for child in parent.children(recursive=False):
            if "api grpc" in " ".join(child.cmdline()) or "code-server" in " ".join(child.cmdline()):
                child.send_signal(sig)
        parent.send_signal(sig)
        self.proc.wait(timeout=60)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
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
