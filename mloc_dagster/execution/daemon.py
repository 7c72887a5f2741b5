"""`dagster-daemon run` on this code location's workspace, as a user starts it: the demo, the
benchmarks and the tests start and stop it through this one class.

The daemon runs in its own session (process group) with its output appended to a log file;
``stop`` sends SIGTERM to the whole group (the daemon, its code server and the warm-fork
launcher's server) and waits. Run workers it launched are not in that group and finish their runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from mloc_dagster.paths import REPO


def default_signals() -> None:
    """``preexec_fn`` of a long-running child (the daemon, `dagster dev`): SIGINT and SIGTERM back to
    their defaults. A parent started in the background (``nohup``, ``&``, CI) ignores SIGINT;
    Dagster's interrupt handling (``setup_interrupt_handlers``) then gives SIGTERM the same ignored
    disposition in that process, and an ignored signal survives ``exec``: the child would never
    stop on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DaemonProcess:
    """One `dagster-daemon run -w workspace.yaml` with its log at ``log_path``."""

    def __init__(self, log_path: Path, env: Mapping[str, str] | None = None):
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                          str(REPO / "workspace.yaml")], cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=default_signals)
        return self

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to the daemon's process group, then wait for the daemon (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
