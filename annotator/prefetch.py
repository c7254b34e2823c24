"""One stage on a background thread, fed and drained by the caller's: how a worker with a core to
spare overlaps its stages.

A worker decodes a batch of frames (FFmpeg), finds faces on it (ONNX Runtime), then aligns and
scores them (torch, ONNX Runtime); all of these release the GIL. Done one after the other, a
core idles whenever the worker has more than one (one worker on a machine, ``--workers 1``).
:func:`map_ahead` runs the slowest stage, finding faces, on a thread of its own while the caller's
thread decodes the batches it needs next and scores the ones it has done: two threads, one per
core. Measured on 2 cores (the pipeline alone, frames/s, median of three passes, alternating
runs): 124.3 / 116.5 at 720p, 93.2 / 98.8 at 1080p, 57.9 / 57.5 with four faces, against 124.5 /
109.7, 85.0 / 93.3 and 53.4 / 54.9 with a third thread for decoding alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()


class _Failed:
    """An exception raised by ``fn``, carried to the caller's thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def map_ahead(fn: Callable[[T], U], source: Iterator[T], ahead: int = 3,
              spare: Callable[[U], U] | None = None) -> Iterator[U]:
    """``fn(item)`` for each item of ``source``, in order, with ``fn`` on a background thread.

    ``spare``: work the caller would otherwise do on a result, done on the background thread
    when that thread is the one ahead: no item waits for it, or earlier results still wait for
    the caller. The two threads so share that work by load; the caller tells done from not done
    on the result itself.

    The caller's thread reads ``source`` (keeping up to ``ahead`` items handed to the thread and
    not yet returned) and does its own work between results, so ``source`` and the caller's work
    overlap ``fn``. An exception from ``fn`` or ``source`` is raised in the caller where its item
    would have come; closing the returned generator early (or an error) stops the thread before
    this returns. ``source`` is read and left on the caller's thread: its owner closes it.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    # Neither queue needs a bound of its own: the caller never hands out more than ``ahead``.
    inputs: queue.SimpleQueue = queue.SimpleQueue()
    outputs: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while (item := inputs.get()) is not _END:
            try:
                result = fn(item)
                if spare is not None and (inputs.empty() or not outputs.empty()):
                    result = spare(result)
                outputs.put(result)
            except BaseException as exc:  # noqa: BLE001 - carried to the caller and raised there
                outputs.put(_Failed(exc))
                return
        outputs.put(_END)

    thread = threading.Thread(target=work, name="map-ahead", daemon=True)
    thread.start()
    handed, exhausted = 0, False
    failure: BaseException | None = None  # from the source: raised after the items before it
    try:
        while True:
            while not exhausted and handed < ahead:
                try:
                    item = next(source, _END)
                except Exception as exc:  # noqa: BLE001 - raised below, in its place
                    failure, item = exc, _END
                exhausted = item is _END
                inputs.put(item)
                handed += not exhausted
            result = outputs.get()
            if result is _END:
                if failure is not None:
                    raise failure
                return
            if isinstance(result, _Failed):
                raise result.error
            handed -= 1
            yield result
    finally:
        inputs.put(_END)  # the thread finishes the item it holds (if any) and stops
        thread.join()
