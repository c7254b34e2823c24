"""Ends a Ray worker that makes no progress on its work item, so that the run goes on without it.

Why: a file that hangs its worker (a decoder looping on a hostile file, a read that never
returns) would hold that worker for ever, and the run would never end, nor would any re-run of
it. A worker that ends is replaced and its item tried again, then given up with a failed row
(:mod:`annotator.actor_pool`), as for a crash.

Progress is what the caller's ``progress()`` returns (frames decoded, damaged packets skipped)
changing, checked every few seconds on a thread of its own, and every table the item yields.
While the worker waits for the driver to take a table (Ray's backpressure), the watch is off.
That thread ends the process once the item has made no progress for the timeout, after every
thread's traceback and one line naming the item in the log (Ray shows it on the driver's terminal).
A native call that holds the GIL would stop that thread too, so :func:`faulthandler.dump_traceback_later`
backs it up a little later: a C thread that fires whatever the GIL does, with the tracebacks.

The in-process path (``--workers 0``) is watched the same way: there the process is the run,
which then stops with that one line instead of waiting for ever (the videos it finished are kept).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


#: The exit status of a process the watchdog ended (faulthandler's own, for its backup timer).
STALLED_EXIT_CODE = 1


class StallWatchdog:
    """:meth:`watching` an item ends this process once ``seconds`` pass without progress.

    ``seconds`` <= 0 turns it off. One item at a time: the timer is the process's only one.
    """

    def __init__(self, seconds: float, log: TextIO | None = None) -> None:
        self.seconds = seconds
        self.log = log if log is not None else _stderr()
        self._lock = threading.Lock()
        self._paused = False
        self._since = time.monotonic()  # the last progress (or the start of the item)

    @contextmanager
    def watching(self, progress: Callable[[], Any], stalled: str = "") -> Iterator[StallWatchdog]:
        """Watch the work done inside the block; ``progress()`` changes as work is done.
        ``stalled``: the line said last on a stall (one naming the item's file; default: the
        timeout's)."""
        if self.seconds <= 0:
            yield self
            return
        stop = threading.Event()
        self._paused = False
        self._arm()

        def poll() -> None:
            last = progress()
            while not stop.wait(self._every()):
                now = progress()
                with self._lock:
                    if now != last:
                        last = now
                        if not self._paused:
                            self._arm()
                    elif not self._paused and time.monotonic() - self._since >= self.seconds:
                        self._end(stalled)

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

    def _every(self) -> float:
        """How often progress is checked: the line comes at most this late."""
        return min(5.0, self.seconds / 4)

    def _arm(self) -> None:
        """Progress now: the timeout counts from here (the C timer's a little later)."""
        self._since = time.monotonic()
        faulthandler.dump_traceback_later(self.seconds + 2 * self._every(), exit=True, file=self.log)

    def _end(self, stalled: str) -> None:
        """The stall: every thread's traceback (where it hung), the line, then this process's end."""
        faulthandler.cancel_dump_traceback_later()
        self.log.flush()
        faulthandler.dump_traceback(file=self.log, all_threads=True)
        self.log.write((stalled or f"no progress for {self.seconds:g} s (--stall-timeout); ending this process") + "\n")
        self.log.flush()
        os._exit(STALLED_EXIT_CODE)


def _stderr() -> TextIO:
    """A stream with a file descriptor for faulthandler (Ray may wrap ``sys.stderr``)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    raise RuntimeError("no stderr with a file descriptor for the stall watchdog")
