"""DaemonProcess starts the daemon with SIGTERM's default, whatever this process ignores: started
from a background job, the suite ignores SIGINT, Dagster's in-process runs then leave SIGTERM
ignored too, and an ignored signal survives exec (the daemon would never stop on SIGTERM)."""

import signal

from mloc_dagster.execution.daemon import DaemonProcess
from tests.daemon import ignores


def test_the_daemon_stops_on_sigterm_even_from_a_parent_that_ignores_it(mloc_home):
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        daemon = DaemonProcess(mloc_home / "daemon.log").start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        assert not ignores(daemon.pid, signal.SIGTERM) and not ignores(daemon.pid, signal.SIGINT)
    finally:
        daemon.stop(timeout_s=60)
    assert daemon.proc.returncode is not None
