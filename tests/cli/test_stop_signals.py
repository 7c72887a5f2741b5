"""StopSignals (`make ui`, `mloc metrics serve`): a stop signal wakes the loop at once, and signals
landing anywhere in the loop cannot break it (they break a loop whose handler sets a threading.Event)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from mloc_dagster.cli.stop_signals import StopSignals
from tests.conftest import REPO

# A loop that polls its stop request (timeout 0) while another thread sends it 2,000 SIGUSR2s,
# then one SIGTERM.
STORM = """
import os, signal, sys, threading, time
def storm():
    for _ in range(2000):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGTERM)
"""
WITH_STOP_SIGNALS = STORM + """
from mloc_dagster.cli.stop_signals import StopSignals
with StopSignals((signal.SIGTERM, signal.SIGUSR2)) as stop:
    threading.Thread(target=storm, daemon=True).start()
    while signal.SIGTERM not in stop.received:
        stop.wait(0)
print("stopped")
"""
WITH_EVENT = STORM + """
stop, got = threading.Event(), []
for s in (signal.SIGTERM, signal.SIGUSR2):
    signal.signal(s, lambda n, _: (got.append(n), stop.set()))
threading.Thread(target=storm, daemon=True).start()
while signal.SIGTERM not in got:
    stop.wait(0)
print("stopped")
"""


def storm(code: str) -> str:
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             env=dict(os.environ) | {"PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return "hung"
    return out.stdout.strip() or out.stderr


def test_a_signal_anywhere_in_the_loop_never_breaks_it():
    assert storm(WITH_STOP_SIGNALS) == "stopped"


def test_a_stop_signal_wakes_the_wait_at_once_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        assert stop.wait(30) is True
        assert time.monotonic() - started < 10 and stop.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_same_storm_breaks_a_loop_whose_handler_sets_a_threading_event():
    """Why StopSignals exists: Event.set() in the handler waits for the lock that the interrupted
    main thread holds inside Event.wait (here: handlers nest until Python gives up)."""
    assert storm(WITH_EVENT) != "stopped"
