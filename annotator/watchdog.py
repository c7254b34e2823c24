"""Ends a Ray worker that makes no progress on its work item, so that the run goes on without it.

Why: a file that hangs its worker (a decoder looping on a hostile file, a read that never
returns) would hold that worker for ever, and the run would never end, nor would any re-run of
it. A worker that ends is replaced and its item tried again, then given up with a failed row
(:mod:`annotator.actor_pool`), as for a crash.

Progress is what the caller's ``progress()`` returns (frames decoded, damaged packets skipped)
changing, checked every few seconds on a thread of its own, and every table the item yields.
While the worker waits for the driver to take a table (Ray's backpressure), the watch is off.
The timer is :func:`faulthandler.dump_traceback_later`: a C thread that fires even while a
native call holds the GIL, writes every thread's traceback to the worker's log (Ray shows it on
the driver's terminal), and ends the process.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class StallWatchdog:
    """:meth:`watching` an item ends this process once ``seconds`` pass without progress.

    ``seconds`` <= 0 turns it off. One item at a time: the timer is the process's only one.
    """

    def __init__(self, seconds: float, log: TextIO | None = None) -> None:
        self.seconds = seconds
        self.log = log if log is not None else _stderr()
        self._lock = threading.Lock()
        self._paused = False

    @contextmanager
    def watching(self, progress: Callable[[], Any]) -> Iterator[StallWatchdog]:
        """Watch the work done inside the block; ``progress()`` changes as work is done."""
        if self.seconds <= 0:
            yield self
            return
        stop = threading.Event()
        self._paused = False
        self._arm()

        def poll() -> None:
            last = progress()
            while not stop.wait(min(5.0, self.seconds / 4)):
                now = progress()
                if now != last:
                    last = now
                    with self._lock:
                        if not self._paused:
                            self._arm()

        thread = threading.Thread(target=poll, name="stall-watchdog", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            with self._lock:
                faulthandler.cancel_dump_traceback_later()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Not watched inside the block (waiting for the driver); progress again after it."""
        if self.seconds <= 0:
            yield
            return
        with self._lock:
            self._paused = True
            faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            with self._lock:
                self._paused = False
                self._arm()

    def _arm(self) -> None:
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=self.log)


def _stderr() -> TextIO:
    """A stream with a file descriptor for faulthandler (Ray may wrap ``sys.stderr``)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    raise RuntimeError("no stderr with a file descriptor for the stall watchdog")
