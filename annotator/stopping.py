"""SIGTERM stops a command as Ctrl-C does: cleanly, with one line, finished work kept.

Why: a cluster's scheduler (Slurm at a job's time limit, Kubernetes evicting a pod) asks a
process to stop with SIGTERM before it kills it. Left to the default, the process dies at once,
and once Ray is started its own C++ handler prints a stack dump first, which reads like a crash.
Raised as :class:`Terminated` (a ``KeyboardInterrupt``), the stop unwinds like Ctrl-C: the
workers are killed, every finished part stays written (a part is renamed into place only when
complete), and a re-run resumes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

#: The exit status of a process stopped by SIGTERM, as a shell reports it (128 + 15).
EXIT_TERMINATED = 128 + signal.SIGTERM
_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def stop_on_sigterm() -> None:
    """Raise :class:`Terminated` in the main thread on SIGTERM. Call it again after ``ray.init()``,
    which installs a handler of its own. Only the main thread may set handlers: elsewhere (a
    caller's thread, a test runner's) this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def terminated() -> bool:
    """Whether this process received SIGTERM. Ask this rather than the exception's type: a
    SIGTERM that arrives while the driver blocks in ``ray.wait`` reaches Python through Ray's
    own signal check, which raises a plain ``KeyboardInterrupt`` in place of our
    :class:`Terminated` (checked with Ray 2.60)."""
    return _received.is_set()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    _received.set()
    raise Terminated()
