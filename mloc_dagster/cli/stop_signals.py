"""SIGINT/SIGTERM as a stop request for a long-running command's main loop (`make ui`, `mloc
metrics serve`).

The Python handler only records the signal: no lock is taken (a ``threading.Event`` takes one, and a
signal landing while the main thread holds it deadlocks the handler). ``wait`` sleeps on a pipe
that Python's C-level handler writes to (``signal.set_wakeup_fd``), so it wakes at once.
"""

from __future__ import annotations

import os
import select
import signal
from types import TracebackType


class StopSignals:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: list[int] = []

    def __enter__(self) -> StopSignals:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write)
        self._previous = {sig: signal.signal(sig, lambda signum, _: self.received.append(signum))
                          for sig in self.signals}
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, or until a stop signal arrives; True once one has."""
        if not self.received:
            ready, _, _ = select.select([self._read], [], [], timeout_s)
            if ready:
                os.read(self._read, 512)
        return self.requested
