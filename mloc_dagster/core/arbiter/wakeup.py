"""Waking a waiter the moment its grant is written: one named pipe per waiting thread.

Whoever frees a device grants it inside the same transaction and then writes a byte to the
waiter's pipe, so a waiter learns of its grant in well under a millisecond, with a plain read and
no lock. Waiters also wake on a slow timer (see ``Arbiter.acquire``), so a lost byte costs at most
one timer period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
from pathlib import Path

import psutil

log = logging.getLogger("mloc_dagster.arbiter")


class Waker:
    """A named pipe a waiting thread sleeps on; a granting process writes a byte to wake it at once.

    One per thread and arbiter, reused across requests: creating a FIFO per request costs more
    than the rest of an uncontended acquire.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mkfifo(path)
        # Opened non-blocking for reading, plus a writer of our own: with no writer at all, poll()
        # reports end-of-file forever and the waiter would spin.
        self._rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._rfd, selectors.EVENT_READ)

    @classmethod
    def create(cls, path: Path) -> Waker | None:
        if not hasattr(os, "mkfifo"):
            return None
        try:
            return cls(path)
        except OSError as exc:  # a file system without FIFOs: fall back to fast polling
            log.debug("no wake-up pipe (%s); polling instead", exc)
            return None

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._rfd, 4096):
                pass

    def wait(self, timeout_s: float) -> bool:
        ready = bool(self._selector.select(max(0.0, timeout_s)))
        if ready:
            self.drain()
        return ready

    def close(self) -> None:
        self._selector.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()


# A grant made in a transaction: the lease id and the waiter's wake-up pipe, if it has one.
Grant = tuple[str, str | None]


def wake(path: str | None) -> None:
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # gone, or nobody listening: the waiter's poll timer covers it
        return
    try:
        os.write(fd, b"!")
    except OSError:  # pipe full: the waiter has wake-ups pending already
        pass
    finally:
        os.close(fd)


def clean_stale_wakers(directory: Path) -> None:
    """Remove wake-up pipes left by processes that died (names start with the pid)."""
    for path in directory.glob("*.fifo"):
        pid_text = path.name.split("-", 1)[0]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            with contextlib.suppress(OSError):
                path.unlink()

