"""Run an iterator ahead on a background thread: how a worker with cores to spare chains its stages.

A worker decodes a batch of frames (FFmpeg), finds faces on it (ONNX Runtime), then aligns and
scores them (torch, ONNX Runtime); all of these release the GIL. Done one after the other, a
core idles whenever the worker has more than one (one worker on a machine, ``--workers 1``);
chained with :func:`prefetched` (``annotator.pipeline``), the next batch decodes while faces are
found on this one and the one before is scored, and the pipeline approaches its slowest stage
rather than the sum of all stages.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
#: How often a blocked producer looks whether the consumer has gone (seconds).
_POLL_S = 0.1


class _Failed:
    """An exception raised by the source, carried to the consumer's thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(source: Iterator[T], depth: int = 2) -> Iterator[T]:
    """The items of ``source``, produced up to ``depth`` ahead on a daemon thread.

    Exceptions from ``source`` are raised in the consumer at the point where the item would have
    come. Closing the returned generator early (or an exception in the consumer) stops the thread
    and closes ``source`` on that thread, which is the one that ran it, so a decoder's file is
    released before this returns.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(item):
                    break
            else:
                offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - carried to the consumer and raised there
            offer(_Failed(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
